"""Who is calling: tenants from their keys (only hashes are held), the
throttle on failed credentials, and ``tenant_of(request)``, the one way a
route authenticates its caller (``tenants``); JWTs from the identity
providers of ``[[issuers]]`` (``tokens``); and how clients discover them
(``discovery``, RFC 9728).

Imports only the shared vocabulary: never the upstream client, the relay,
the frontends or the app.
"""
