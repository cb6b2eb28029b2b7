"""Serving: an inference engine, the LLaVA controller / model worker / web server, an OpenAI-compatible API and a
one-process Gradio demo.

Every front end talks to one :class:`~cambrian_core.serve.engine.InferenceEngine` per loaded model; the engine owns
the model, queues and batches requests on one worker thread and keeps every per-request value (prompt, images,
sampling settings, generated text) in the request object, never on the model.
"""
