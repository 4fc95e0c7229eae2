"""nginx as an SSE reverse proxy, for the benchmark: the configuration people deploy.

``proxy_buffering off`` so that events go out as they arrive, HTTP/1.1 and a
keep-alive pool to the upstream (idle connections kept as long as the
gateway's), no access log (as for the other proxies), as many worker
processes as the gateway has (one by default). Installed from Debian's
package when missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# How long an idle upstream connection is kept, by nginx and by the gateway
# alike in the benchmark (nginx's default; the emulator keeps them 75 s).
UPSTREAM_IDLE_S = 60

CONF = """\
worker_processes {workers};
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream chatiq {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
        keepalive_timeout {idle_s}s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location /api/chat {{
            proxy_pass http://chatiq;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def ensure_nginx() -> str:
    """The nginx binary, installed with apt when missing."""
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if not found:
        print("bench: installing nginx (apt-get install nginx-light)", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True)
        found = shutil.which("nginx") or "/usr/sbin/nginx"
    return str(found)


def start_nginx(
    prefix: Path, port: int, upstream_port: int, nofile: int, workers: int = 1
) -> subprocess.Popen[bytes]:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        CONF.format(
            prefix=prefix,
            port=port,
            upstream_port=upstream_port,
            nofile=nofile,
            connections=max(1024, nofile - 64),
            workers=workers,
            idle_s=UPSTREAM_IDLE_S,
        )
    )
    return subprocess.Popen(
        [ensure_nginx(), "-p", str(prefix), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
    )
