"""What frontends keep of their clients between requests: the responses the
OpenAI Responses API gave out, each with the ChatIQ conversation it continues
(``previous_response_id``; ``store``), and MCP's running tool calls and ended
sessions (``tool_calls``). In this process, or through Redis for a fleet. A
service: it imports only the vocabulary."""
