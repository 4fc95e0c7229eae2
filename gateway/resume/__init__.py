"""Resumable streams: a stream outlives its connection and is resumed with
``Last-Event-ID``, on this process or (through Redis) on any replica.

- ``journal``: a stream's events, kept for its readers;
- ``recorder``: the upstream's events into a journal, whoever reads them;
- ``streams`` and ``redis_log``: the journals of this process, and their
  copies in Redis for other replicas;
- ``serve``: the resumable stream's response, and the resume routes.

Imports the layers below it (quotas, auth, the upstream client, the shared
vocabulary), never the relay, the pipeline, a frontend or the app: it sees a
frontend as the ``gateway.chat.WireFormat`` the pipeline hands it.
"""
