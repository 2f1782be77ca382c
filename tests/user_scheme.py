"""A user's module, as `revnets --import user_scheme` loads it: one block class that defines only
`__init__(channels, **kw)` and `couplings()`, registered as a scheme, and two registered models.

conftest.py imports it, so every test over the registry (tests/test_schemes.py) covers this
scheme without naming it.
"""
from torch import nn

import revnets
from revnets.blocks import operator


class TanhCoupling(revnets.ReversibleBlock):
    """Y += F(Z), Z += G(Y) with F, G = K2 tanh(K1 .) on C/2 channels, K an operator of any dim."""

    def __init__(self, channels: int, width: int = 4, dim: int = 2):
        super().__init__()
        half = channels // 2
        self.f = nn.Sequential(operator(half, width, dim), nn.Tanh(), operator(width, half, dim))
        self.g = nn.Sequential(operator(half, width, dim), nn.Tanh(), operator(width, half, dim))

    def couplings(self):
        return revnets.Coupling(+1, self.f), revnets.Coupling(+1, self.g)


revnets.register_scheme("user-tanh", TanhCoupling, width=4)
revnets.register_model("user-tanh-6", scheme="user-tanh", units=(2, 2, 2), channels=(8, 16, 16))
revnets.register_model("hamiltonian-tiny", scheme="hamiltonian", units=(2, 2), channels=(8, 8), h=0.05)
