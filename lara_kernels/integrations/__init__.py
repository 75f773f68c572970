"""LARA where models already are: Hugging Face ``transformers`` and ``timm``.

- :mod:`lara_kernels.integrations.transformers`: ``register()`` adds ``"lara"`` to
  transformers' attention and mask interfaces, so
  ``AutoModel.from_pretrained(path, attn_implementation="lara")`` runs encoder models
  (the BERT and ViT families) with LARA. Needs the extra ``lara-kernels[transformers]``.
- :mod:`lara_kernels.integrations.timm`: ``LaraTimmAttention`` (timm's ``attn_layer``)
  and ``convert(model)`` for an existing timm ``VisionTransformer``. Needs ``timm``.
- Plain PyTorch: :func:`lara_kernels.nn.convert`.

The submodules import their library only when imported themselves, so
``import lara_kernels.integrations`` never needs either.
"""

__all__ = ["transformers", "timm"]
