"""ImageBind-LLM: the language-model side (LLaMA backbone, bind network, gated visual injection, decoding).

Modules (import them directly; this package imports nothing heavy on purpose):

- `model`: `ImageBindLLM`, the bind network and the LoRA/bias/gate patches applied to a transformers LLaMA.
- `checkpoints`: loaders for Meta LLaMA, Hugging Face LLaMA and the official ImageBind-LLM adapter file.
- `tokenizer`: the small `TextTokenizer` protocol with SentencePiece and Hugging Face adapters.
- `backbones`: offline backbones (the embedded SmolLM2 default, a tiny random model).
- `fusion`, `visual_cache`: turning ImageBind embeddings into the one feature the model conditions on.
- `prompt`, `generation`: prompt templates and KV-cached, streaming decoding.
"""
