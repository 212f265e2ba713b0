"""The simulated world: users, products, hidden segments and a pixel-based click model."""
