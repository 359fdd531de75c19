"""The DINO recipe (DINO + iBOT + KoLeo, optional Gram anchoring) of the pretrain, gram and highres stages."""
