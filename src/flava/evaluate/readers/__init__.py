"""Readers of the data sets FLAVA is fine-tuned on, each returning checked `flava.finetune.examples`
holders: `text` (GLUE, tables of text), `multimodal` (VQAv2, easy-vqa, SNLI-VE, Hateful Memes),
`user_files` (a user's folders and tables for `flava finetune`); `splits` is what they share.

Every reader checks what it reads and raises `DataError` naming the file (and line) of the first
problem. Where a data set publishes no labelled test split (GLUE's test.tsv, VQAv2's test-dev),
its development split is the test split, as in the paper's tables, and the validation split that
picks the checkpoint is carved out of train with a seed.
"""
