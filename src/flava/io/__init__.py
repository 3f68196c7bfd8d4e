"""Files on disk: JSON and atomic writes, checkpoint directories, the run-directory layout.

Nothing here imports the model: checkpoints are read and written as dicts and tensors.
"""
