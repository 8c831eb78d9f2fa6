"""Real models: not part of the course, which runs on the toy world's GPT.

- ``hf``: the model interface (``CausalLM``) and the Hugging Face adapter (``transformers``, optional)
- ``gpt2``: GPT-2 weights in minialign's own GPT (safetensors read and written by hand)
- ``export``: a trained stage's model as a Hugging Face folder (``minialign export``)
"""
