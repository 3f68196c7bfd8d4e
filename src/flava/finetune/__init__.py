"""Fine-tuning FLAVA on downstream tasks, as the paper's supplement (B.2) describes.

- Text tasks (GLUE and the like): a head on the text encoder's CLS state (after its final
  LayerNorm). The head is RoBERTa's classification head, since the paper fine-tunes GLUE "following
  the setup of RoBERTa": dropout → Linear(d, d) → tanh → dropout → Linear(d, classes), or one
  output trained with MSE for regression (STS-B). Its dense + tanh is a BERT pooler of its own,
  freshly initialised: no pretraining objective trains the encoder's `pooler`, so copying it would
  only copy its initialisation. Only the text encoder is copied and run.
- Image + text tasks (VQA, SNLI-VE, Hateful Memes): "a 2-layer classifier head with a hidden
  dimension of 1536 on top of h_CLS,M". The supplement names no layers beyond that; we follow
  ViLT's VQA head, whose hidden size is the same 2 × 768 = 1536 and which FLAVA's VQA loss also
  follows: Linear(d, 1536) → LayerNorm → GELU → dropout → Linear(1536, classes). (TorchMultimodal's
  `flava_model_for_classification` defaults differ: hidden 768, ReLU, dropout 0.5, no norm.)
  VQA is multi-label: BCE-with-logits on the soft scores, times the number of answers (ViLT);
  the others are single-label cross-entropy.

- Image classification: a copy of the image encoder and a linear head (after dropout) on its CLS
  state after the final LayerNorm, the feature the paper's linear probes read; ViT and BEiT
  fine-tune with a linear head on this state too. Images get the eval transform (resize +
  center crop), computed once: no augmentation.

All modes: `train_encoders=True` fine-tunes everything on the path (full fine-tuning);
`train_encoders=False` freezes the encoders, computes every example's feature once, then trains
the head alone on those vectors (orders of magnitude faster on a CPU).

The training loop: AdamW with FLAVA's decay rules, linear warmup then cosine decay, evaluation on
the validation split every epoch (or every `eval_every` steps, and always after the last step),
the best state on the task's first metric kept in memory and restored for scoring the test
split. The caller's model is deep-copied and never changed; given a seed the run is
deterministic (it forks the global RNG, so the caller's random state is untouched too).

The modules: `settings` (what a run takes and gives), `heads` (heads and classifiers), `text`
(tokenizing texts and pairs), `splits` (splits as tensors, scoring), `loop` (the loop and the
entry points), `examples` (fine-tuning data), `taskmodel` (the saved task model and predict).
"""
