"""Who is calling: tenants from their keys (only hashes are held), the
throttle on failed keys, and ``tenant_of(request)``, the one way a route
authenticates its caller (``tenants``).

Imports only the shared vocabulary: never the upstream client, the relay,
the frontends or the app.
"""
