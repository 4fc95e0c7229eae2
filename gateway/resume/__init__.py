"""Resumable streams: a stream outlives its connection and is resumed with
``Last-Event-ID``, on this process or (through Redis) on any replica."""
