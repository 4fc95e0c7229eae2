"""The routes that are not a frontend's: the sample page and CORS for browsers
(``page``), health, readiness, metrics and the OpenAPI document (``ops``).

They sit beside the frontends: they may import the layers below (auth, the
upstream's breakers, the shared vocabulary), never the pipeline or the app.
"""
