"""
The server's own tokenizer, in vLLM's shapes, so that clients count and build prompts with exactly the model's
tokens (lm-evaluation-harness's tokenizer_backend=remote): POST /tokenize, POST /detokenize, GET /tokenizer_info.
"""
from fastapi import Request

from nanochat.hf_tokenizer import CHAT_TEMPLATE
from serve.api_common import read_body
from serve.protocol import ApiError, DetokenizeRequest, TokenizeRequest, conversation

# as the Hugging Face export names them, so the endpoint and an exported tokenizer agree
BOS, EOS = "<|bos|>", "<|assistant_end|>"


def add_tokenizer_routes(app, service, access):
    tokenizer = service.tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """{"prompt": text} (special-token strings are those tokens; add_special_tokens prepends <|bos|>) or
        {"messages": [...]} (the chat rendering, with add_generation_prompt the assistant's turn opened)."""
        access.check(request)
        req = await read_body(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either 'prompt' or 'messages'")
        if req.prompt is not None:
            ids = ([tokenizer.get_bos_token_id()] if req.add_special_tokens else []) + \
                tokenizer.encode_with_special(req.prompt)
        else:
            ids = service.prompt(conversation(req.messages))
            ids = ids if req.add_generation_prompt else ids[:-1]
        return {"count": len(ids), "max_model_len": service.seq_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        access.check(request)
        req = await read_body(request, DetokenizeRequest)
        vocab = tokenizer.get_vocab_size()
        if not all(0 <= t < vocab for t in req.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        access.check(request)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
                "chat_template": CHAT_TEMPLATE, "model_max_length": service.seq_len,
                "vocab_size": tokenizer.get_vocab_size(), "add_bos_token": False}
