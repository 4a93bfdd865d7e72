"""The chat panel: questions, streaming answers with their source chips, stop / retry / clear, and
the generation settings.

Answering is a model job (the shared queue); when one ends, the inspector opens on the new last
answer and the corpus panel's memory figures follow. A request the session cannot serve (a full
conversation, a broken one, a busy session) is a warning with what to do (app/errors.py) and the
chat as it stands; a model failure is an error for this user only, and the corpus stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from runtime import GenerationParams

from .. import errors as E
from .. import render as R
from . import Context
from .header import SAMPLE_QUESTION


@dataclass
class ChatPanel:
    chatbot: gr.Chatbot
    chips: gr.HTML
    question: gr.Textbox
    ask: gr.Button
    stop: gr.Button
    retry: gr.Button
    clear: gr.Button
    max_new: gr.Slider
    temperature: gr.Slider
    seed: gr.Number

    @property
    def outputs(self) -> list:
        """What a view refresh updates (a chat job also clears the question box)."""
        return [self.chatbot, self.chips]

    def views(self, ws) -> dict:
        last = len(ws.turns) - 1
        return {self.chatbot: R.messages(ws.turns), self.chips: R.chips(last, ws.turns[-1].sources) if ws.turns else ""}


def build(ctx: Context) -> ChatPanel:
    with gr.Column(scale=7, min_width=420, elem_classes="ll-panel", elem_id="ll-chat-panel"):
        gr.HTML('<div class="ll-h">Chat</div>')
        chatbot = gr.Chatbot(height=520, elem_id="ll-chat", show_label=False, buttons=["copy"],
                             placeholder="Answers stream here, with the lines of your files they came from.",
                             feedback_options=None)
        chips = gr.HTML("", elem_id="ll-chips")
        with gr.Row(elem_classes="ll-ask"):
            question = gr.Textbox(show_label=False, placeholder=f"Ask about your files, e.g. {SAMPLE_QUESTION}",
                                  scale=6, lines=1, max_lines=4, elem_id="ll-question")
            ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ll-ask")
        with gr.Row(elem_classes="ll-buttons"):
            stop = gr.Button("Stop", size="sm", variant="stop", elem_id="ll-stop")
            retry = gr.Button("Retry", size="sm", elem_id="ll-retry")
            clear = gr.Button("Clear chat", size="sm", elem_id="ll-clear")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                max_new = gr.Slider(1, 512, value=48, step=1, label="max new tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0: greedy)")
                seed = gr.Number(value=-1, precision=0, label="seed (-1: random)")
    return ChatPanel(chatbot, chips, question, ask, stop, retry, clear, max_new, temperature, seed)


def params_of(max_new_tokens, temperature, seed) -> GenerationParams:
    seed = int(seed) if seed not in (None, "") and float(seed) >= 0 else None
    return GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=seed)


def wire(ctx: Context, chat: ChatPanel, corpus, inspector) -> None:
    registry = ctx.registry

    def job(request: gr.Request, run, busy: str):
        """Stream (chatbot, chips, question) while `run(ws)` yields turns."""
        k = ctx.key(request)
        if ctx.engine is None:
            raise gr.Error(f"No model is loaded: {ctx.problem}")
        try:
            with registry.use(k, busy) as ws:
                for _ in run(ws):
                    yield {**chat.views(ws), chat.question: ""}
        except Exception as e:
            if E.code_of(e) is None:  # shown to this user only; the corpus stays (Clear chat resets a broken chat)
                raise gr.Error(f"The model failed ({type(e).__name__}: {e}). Your corpus is still loaded: "
                               "press Clear chat to continue.") from e
            gr.Warning(E.explain(e).text())  # a request it could not serve: the chat as it stands
            yield {**chat.views(registry.peek(k)), chat.question: gr.update()}

    def ask(question, max_new_tokens, temperature, seed, request: gr.Request):
        if not (question or "").strip():
            gr.Warning("Type a question first.")
            yield {**chat.views(ctx.workspace(request)), chat.question: gr.update()}
            return
        params = params_of(max_new_tokens, temperature, seed)
        yield from job(request, lambda ws: ws.ask(question, params), "answering")

    def retry(max_new_tokens, temperature, seed, request: gr.Request):
        params = params_of(max_new_tokens, temperature, seed)
        yield from job(request, lambda ws: ws.retry(params), "answering")

    def clear(request: gr.Request):
        def run(ws):
            ws.clear()
            yield None
        yield from job(request, run, "clearing the chat")

    def after_answer(request: gr.Request):
        """The inspector on the new last answer; the corpus panel's memory figures."""
        ws = ctx.workspace(request)
        return {**inspector.reset(ws), **corpus.views(ctx, ws)}

    def stop(request: gr.Request):
        ctx.workspace(request).stop_event.set()

    out = [*chat.outputs, chat.question]
    gen = [chat.max_new, chat.temperature, chat.seed]
    after = dict(fn=after_answer, inputs=None, outputs=[*inspector.outputs, *corpus.outputs], api_name=False,
                 show_progress="hidden")
    chat.ask.click(ask, [chat.question, *gen], out, api_name="ask", show_progress="minimal", **ctx.model_job).then(
        **after)
    chat.question.submit(ask, [chat.question, *gen], out, api_name=False, show_progress="minimal",
                         **ctx.model_job).then(**after)
    chat.retry.click(retry, gen, out, api_name="retry", show_progress="minimal", **ctx.model_job).then(**after)
    chat.clear.click(clear, None, out, api_name="clear", **ctx.model_job).then(**after)
    chat.stop.click(stop, None, None, queue=False, api_name="stop")


__all__ = ["ChatPanel", "build", "params_of", "wire"]
