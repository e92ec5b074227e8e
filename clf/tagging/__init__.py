"""Tagging a store's product photos: `photos` brings a photo into the model's domain, `pipeline` runs the
Ray Data job that tags a folder or listing of them."""
