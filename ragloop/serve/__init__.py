"""``ragloop serve``: an OpenAI-compatible HTTP server over any ragloop policy.

- ``app.create_app(policy, ServeConfig(...))``: the FastAPI application (chat, completions, embeddings,
  models, health; tokenize/detokenize/apply-template for clients that need the model's tokenizer);
- ``decoder.Decoder``: the one place decoding is submitted (concurrent requests batched together);
- ``capture.TraceCapture``: every served call as a ``Trace`` that ``ragloop train``/``improve`` read;
- ``server.ServerThread`` / ``server.serve``: uvicorn on a bound socket (tests use the thread form).
"""

from ragloop.serve.app import ServeConfig, create_app
from ragloop.serve.server import ServerThread, serve

__all__ = ["ServeConfig", "ServerThread", "create_app", "serve"]
