"""Renderers: turn a creative prompt plus a product image into an ad image."""
