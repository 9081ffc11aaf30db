"""Collaborative-filtering core: data on inner indices, fastai trainers, numpy scoring, fold-in, metrics."""
