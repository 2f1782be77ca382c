"""Multi-level depth doubling (Chang et al., ICLR 2018, "Multi-level residual networks from
dynamical systems view"): a trained network of step h becomes a network of twice the depth and
step h / 2 that computes the same function up to O(h), and trains on from there.

Each block of a reversible chain, the step Y_{j+1} = Phi_h(Y_j; K_j), becomes two consecutive copies
Phi_{h/2}(Phi_{h/2}(Y_j; K_j); K_j): the same ODE over the same time interval, discretised twice as
finely. A unit's entry block (which may widen the state) stays as it is. The first step of a
language model's two-step chain (the layer whose `start` is set, `revnets.layers.Layer`: MidPoint's
forward Euler step, Leapfrog's step from rest or from the fixed point) becomes that first step and
an ordinary one.

Two-step schemes (MidPoint, Leapfrog) carry the state (Y_{j-1}, Y_j), two points of the trajectory h
apart: their difference is the step's velocity, Y' ~ (Y_j - Y_{j-1}) / h. With step h / 2 the pair
must be h / 2 apart, so after the entry block the grown unit re-spaces the pair by linear
interpolation, Y_{j-1} <- Y_j - (Y_j - Y_{j-1}) / 2, which keeps the velocity. Without it a Leapfrog
unit would advance its state twice as far (an O(1) change: with K = 0 its n blocks compute
Y_j = (j + 1) Y_0) and a MidPoint unit would start an O(h) parasitic oscillation. The one-step
schemes' state (Y, Z) is one point in time and needs nothing, nor does a language model's chain:
it starts from the state (x, x), and its first layer places the point before x as its `init` says,
at rest x itself, from the fixed point x - h F_0(x) with the halved h, so h / 2 before x.

Measured in float64 on random weights (eval mode, tests/test_multilevel.py): the grown network's
output differs by O(h) for MidPoint and O(h^2) for Hamiltonian and Leapfrog. In train mode,
BatchNorm's batch statistics of nearly constant channels (those a widening entry zero-pads) can
amplify the difference, so compare in eval mode.
"""
import copy

from torch import Tensor, nn

from .engine import AutoSegment
from .networks import ReversibleUnit, chains
from .schemes import SCHEMES, get_scheme


class Respaced(nn.Module):
    """A unit's entry block followed by re-spacing of the two-step state (Y_{j-1}, Y_j) to
    (Y_j - ratio (Y_j - Y_{j-1}), Y_j): from the entry's step h to the chain's step ratio * h."""

    def __init__(self, entry: nn.Module, ratio: float):
        super().__init__()
        self.entry, self.ratio = entry, ratio

    @property
    def block(self) -> nn.Module:
        """The entry's own block (what `ReversibleUnit.__iter__` yields first)."""
        return getattr(self.entry, "block", self.entry)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.entry(a, b)
        return b - self.ratio * (b - a), b


def grow(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every block of a reversible chain is two consecutive copies of
    itself with h halved (weights copied); a unit of n blocks becomes one of 2n - 1 (its entry block
    stays), a language model of depth n one of depth 2n.

    `model`: a `Network`, `ReversibleStack` or `ReversibleTransformer` (its `scheme` must have a step
    size h). Same function up to O(h) (see the module docstring for two-step schemes). The original
    is left untouched. To reload a grown model's state_dict, rebuild the original and grow it as often.
    """
    scheme = getattr(model, "scheme", type(model).__name__)
    if scheme not in SCHEMES or not get_scheme(scheme).has_step or not chains(model):
        stepped = ", ".join(s for s in SCHEMES if SCHEMES[s].has_step)
        raise ValueError(f"grow needs a model of reversible blocks with a step size h ({stepped}); got {scheme!r}")
    model = copy.deepcopy(model)
    for chain in chains(model):
        halved = [_halved(block, second) for block in chain for second in (False, True)]
        del chain[:]
        chain.extend(halved)
        if isinstance(chain.segment, AutoSegment):  # measure the new chain afresh
            chain.segment = AutoSegment(chain.segment.tol, chain.segment.every)
    for unit in [m for m in model.modules() if isinstance(m, ReversibleUnit)]:
        if unit.block.two_step:
            unit.entry = Respaced(unit.entry.entry, unit.entry.ratio / 2) if isinstance(unit.entry, Respaced) \
                else Respaced(unit.entry, 0.5)
    return model


def _halved(block: nn.Module, second: bool) -> nn.Module:
    """A copy of `block` with h / 2; the second copy of a chain's first step (`revnets.layers.Layer.start`)
    is an ordinary step."""
    block = copy.deepcopy(block)
    block.h = block.h / 2
    if second and getattr(block, "start", None):
        block.start = None
    return block
