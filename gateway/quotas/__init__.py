"""Who may start a stream now: the admission slots and their bounded queue
(``admission``), and the tenant quotas kept in this process or shared by the
fleet through Redis (``shared``).

Imports only the shared vocabulary: never the upstream client, the relay,
the frontends or the app.
"""
