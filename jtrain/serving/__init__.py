"""An OpenAI-compatible HTTP server for jtrain models (`python -m jtrain.serve`).

`protocol` turns request bodies into checked `Request`s and results into OpenAI's response
shapes; `batcher` decodes the pending requests together on one worker thread; `app` is the
FastAPI application that joins them (`create_app`).
"""
