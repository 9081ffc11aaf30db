"""Collaborative-filtering core: data on inner indices, fastai trainers, numpy scoring, fold-in, metrics."""

import warnings

# fastai's import scripts a function with torch.jit.script, which torch 2.10+ calls deprecated; the
# warning says nothing to a cfb user, so it is not shown.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
