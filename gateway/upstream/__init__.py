"""The ChatIQ client: everything between the gateway and the upstream API.

- ``client``: ``Upstream``, a request out and an opened stream (or a typed
  error) back, with retries, the bot's breaker and the timeouts;
- ``events``: an upstream event-stream body, read as whole events;
- ``connection`` and ``pool``: the HTTP/1.1 wire protocol (httptools) and the
  keep-alive pool of connections to the origin;
- ``retry``, ``breaker``, ``deadline``: when to try again, when to stop trying;
- ``egress``: the tunnel through the egress proxy (and, in ``pool``, the
  private CA).

Imports only the shared vocabulary (``gateway.config``, ``errors``, ``sse``,
``chat``, ``metrics``, ``logs``): never the relay, the frontends or the app.
"""
