"""An OpenAI-compatible HTTP server for jtrain models (`python -m jtrain.serve`).

`protocol` turns request bodies into checked `Request`s; `batcher` decodes the pending requests
together on one worker thread, after `warmup` has compiled the shapes they will meet; each
request reads its batch row through a `share`, which streams its text as it is sampled;
`responses` writes OpenAI's response and chunk shapes; `app` is the FastAPI application that
joins them (`create_app`).
"""
