"""Tagging a store's product photos: `pipeline` runs the Ray Data job that tags a folder or listing of them
(each photo brought into the model's domain by `clf.photos`, as for training on a catalog)."""
