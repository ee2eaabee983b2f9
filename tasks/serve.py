"""`lifecycle serve`: a stage's model behind an OpenAI-compatible API, on transformers' own server.

transformers' server (`transformers serve`) answers /v1/chat/completions, streamed and not, with the tokenizer's
chat template, tools, stop strings, temperature and max tokens, and lists /v1/models; its handlers, not ours, speak
the protocol. It loads models by Hub id or folder; here it is handed the model the pipeline made, loaded as every
stage loads a checkpoint (an adapter applied to its base and merged in memory, nothing written), with a generation
config that stops at the end of the template's turn and a response template that reads tool calls back. It serves
that one model under one name (`<pipeline>/<stage>`), and binds 127.0.0.1 unless told otherwise.

vLLM would batch requests on a GPU but needs one (and CUDA wheels); MLflow's model serving speaks its own
/invocations, not the chat completions API. bench/serve.py measures what this wrapper costs against
`transformers serve` on the same folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.common.generation import ChatModel


def app(name: str, checkpoint: Path):
    """transformers' FastAPI app serving the checkpoint's model, and only it, as `name`."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager, TimedModel
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    loaded = ChatModel.load(checkpoint)
    created = int(time.time())

    class OneModel(ModelManager):
        """The manager of `transformers serve <model>` (every request pinned to it, never unloaded), holding a model
        already in memory under `name` instead of loading one by id; /v1/models lists it alone."""

        def __init__(self) -> None:
            super().__init__(device=str(loaded.model.device))
            self.force_model = name
            self.model_timeout = -1
            key = self.process_model_name(name)
            self.loaded_models[key] = TimedModel(loaded.model, timeout_seconds=-1, processor=loaded.tokenizer)

        def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
            return [{"id": name, "object": "model", "created": created, "owned_by": "llm-lifecycle"}]

    models = OneModel()
    state = GenerationState(continuous_batching=False, compile=False)
    return build_server(
        models,
        ChatCompletionHandler(model_manager=models, generation_state=state),
        completion_handler=CompletionHandler(model_manager=models, generation_state=state),
        response_handler=ResponseHandler(model_manager=models, generation_state=state),
        transcription_handler=TranscriptionHandler(models, state),
        systemone_handler=SystemOneHandler(model_manager=models, generation_state=state),
        generation_state=state,
    )


def server(name: str, checkpoint: Path, host: str = "127.0.0.1", port: int = 8000):
    """A uvicorn server of `app`; `run()` serves until interrupted."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app(name, checkpoint), host=host, port=port, log_level="warning"))
