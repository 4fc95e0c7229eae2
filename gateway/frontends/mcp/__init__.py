"""The ``mcp`` frontend: the bots as Model Context Protocol tools, over
Streamable HTTP (``server``): JSON-RPC and the protocol's two eras
(``protocol``), signed sessions any replica checks (``sessions``), and the
tools, their calls and results (``tools``).

Like every frontend it imports only the shared vocabulary; its tool calls
run the shared pipeline, handed to it as ``gateway.chat.Pipeline``.
"""

from gateway.frontends.mcp.server import MCPFrontend

__all__ = ["MCPFrontend"]
