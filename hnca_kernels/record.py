"""What a forward pass recorded: every stochastic layer call, its inputs, logits and sample, and
which later calls consumed the sample. HNCA's messages follow that graph, whatever module made it.

    with hnca_kernels.record() as rec:        # every stochastic layer called inside registers
        action = model(x)                     # any nn.Module; layers are called normally
    loss = rec.surrogate_loss(reward, estimator="hnca", baseline=b)
    loss.backward()                           # the estimate of -grad E[R] in every .grad

The record belongs to the caller, not to the modules: two forwards are two records, and a model
holds no batch (deepcopy, pickling, EMA copies stay clean).

What the record models. A call ``layer(h1, h2, x)`` takes the concatenation of its arguments; an
argument that is the sample of an earlier call in the record (the same tensor object), or a
``torch.cat`` of such samples and other tensors along the features, makes that call a child of
the earlier one, and the message uses the weight's columns of that argument. A sample may have
children in several calls (their messages add) and a layer may be called several times (shared
weights). Any other tensor is context: deterministic input, trained by backprop through the logits.

What it cannot see, and what it does then. HNCA credits a unit through its children only, which
is unbiased when the unit's sample reaches the reward through its recorded children alone. Inside
the ``with`` block the record watches the torch operations between layers, with an allow-list:
reading metadata (``h.shape``), ``torch.cat`` along the features and conversions that keep every
value the sample can hold (``detach``, ``clone``, ``.to`` a dtype that represents them) are
followed; any other operation that reads a sample (``h * 2``, ``h.T``, ``h.to(torch.bool)`` of a
+-1 sample, a deterministic module, ``h.sum().item()``, an embedding of a class index) has a path
the record cannot follow, and its unit falls back to REINFORCE, which is unbiased whatever the
path (``rec.fallbacks`` says which units and why; ``record(strict=True)`` raises instead).

Errors, where no estimator can be right: a sample changed in place (its ``_version``), a sample
read through ``.data`` or ``.numpy()`` inside the block (writes through them are invisible), a
child layer's weight changed in place between the forward and the loss (an optimizer step in
between; the messages would use the new weight), and a stochastic layer compiled on its own
(``torch.compile(layer)``) called inside an eager record, which cannot register.

After the block nothing is watched: the reward may read the samples of units without children (the
outputs); pass any other sample it reads as ``outputs=[...]`` to ``surrogate_loss`` (that unit then
falls back too). Under ``torch.compile`` of a whole step operations are not watched either; only
the calls' arguments define the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import relaxed, validation
from .backends import get_backend
from .metrics import linear_gradient_square_sum, linear_gradient_variance

ESTIMATORS = ("hnca", "reinforce")

__all__ = ["record", "Record", "StochasticCall", "ESTIMATORS"]

# The records the current code runs inside, innermost last. torch.compile cannot trace
# ContextVar.set, so while it traces, records live on a plain list instead. _EAGER counts the
# eager records open in the process: a layer compiled on its own cannot read the ContextVar, but
# it can see that one is open somewhere and ask eagerly whether it runs inside it.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("hnca_records", default=())
_TRACED: list = []
_EAGER: list = []


def active_records() -> tuple:
    if torch.compiler.is_compiling():
        if not _TRACED and _EAGER:
            _refuse_compiled_call()
        return tuple(_TRACED)
    return _ACTIVE.get()


def _refuse_compiled_call() -> None:
    """Raise if this context is inside an eager record (run eagerly: a graph break under compile)."""
    global _refuse_compiled_call
    if not getattr(_refuse_compiled_call, "_eager", False):  # torch.compiler is imported once compiling
        def refuse():
            if _ACTIVE.get():
                raise RuntimeError(
                    "hnca: a stochastic layer runs under torch.compile inside an eager hnca_kernels.record(): "
                    "the record cannot see compiled calls, so the layer would get no gradient; compile the whole "
                    "step (the forward inside record(), the loss and backward), or leave the layer uncompiled")

        refuse._eager = True
        _refuse_compiled_call = torch.compiler.disable(refuse)
        _refuse_compiled_call._eager = True
    _refuse_compiled_call()


class _Later:
    """Links to later calls (a call's children, the scored calls of its value), held weakly: the
    record holds every call and the strong links point back only, so a record and its tensors (a
    view of the epoch's data among them) are freed as soon as the last reference goes, not when
    the cycle collector next gets to them (a training loop's memory then grew by an epoch's data
    every few epochs). Reads like a list of the calls."""

    __slots__ = ("_refs",)

    def __init__(self):
        self._refs = []

    def append(self, call) -> None:
        self._refs.append(weakref.ref(call))

    def __iter__(self):
        return (c for c in (r() for r in self._refs) if c is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return any(True for _ in self)

    def __getitem__(self, index):
        return list(self)[index]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


def _later() -> "_Later | list":
    """A call's links to later calls: weak in eager mode; a list while torch.compile traces (it
    cannot trace the weak references, and what it traces is built once)."""
    return [] if torch.compiler.is_compiling() else _Later()


@dataclass(eq=False)
class Segment:
    """Columns [start, stop) of a call's input, and the call whose sample they are (None: context)."""

    start: int
    stop: int
    source: "StochasticCall | None"


@dataclass(eq=False, repr=False)
class StochasticCall:
    """One call of a stochastic layer inside a record: sampled (the layer drew ``sample``) or scored
    (``layer(..., observed=value)``: ``sample`` is the given value, a component of the objective)."""

    index: int
    layer: nn.Module
    inputs: torch.Tensor          # the concatenated input [B, in_features]
    segments: tuple               # Segment per run of columns
    logits: torch.Tensor          # with autograd history ([B, out], or [B, V, K] for categorical)
    sample: torch.Tensor
    children: _Later = field(default_factory=_later)  # later calls that take this sample as input
    unmodeled: list = field(default_factory=list)  # why HNCA cannot credit this unit (-> REINFORCE)
    version: int = 0                               # sample._version when drawn
    weight_version: int = 0                        # layer.weight._version at the call
    feeds_unmodeled: bool = False                  # reaches a later call through other operations
    observed: bool = False                         # a scored call
    value_source: "StochasticCall | None" = None   # scored: the sampled call whose sample is the value
    value_of: _Later = field(default_factory=_later)  # sampled: the scored calls whose value is its sample
    tainted_by: frozenset = frozenset()            # calls whose samples reach the inputs (or value) otherwise

    @property
    def parents(self) -> list:
        """The calls whose samples are among this call's inputs (followed columns), in call order."""
        return sorted({s.source for s in self.segments if s.source is not None}, key=lambda c: c.index)

    def __repr__(self) -> str:
        kind = "scored" if self.observed else "sampled"
        value = f", value of {self.value_source.index}" if self.value_source is not None else ""
        return (f"StochasticCall({self.index}: {type(self.layer).__name__} {kind}, "
                f"parents={[p.index for p in self.parents]}{value}, children={[c.index for c in self.children]})")


class _Watcher(TorchFunctionMode):
    """Follows samples through the torch operations between layer calls (eager only).

    An allow-list: reading metadata is not a path; a ``torch.cat`` along the features and the
    conversions that keep every value a sample can hold (``detach``, ``clone``, ``.to`` a dtype
    that represents them exactly, ...) keep track of which columns hold which sample; any other
    operation that reads a sample, including views such as ``.T`` and casts that change values
    (a +-1 sample to bool), marks its unit unmodeled and taints what it computes. ``.data`` and
    ``.numpy()`` of a sample raise: writes through them bypass the in-place check.
    """

    def __init__(self, rec: "Record"):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if not rec._columns and not rec._tainted:
            return func(*args, **kwargs)
        name = _operation_name(func)
        if name in _METADATA:
            return func(*args, **kwargs)
        leaves = list(_tensors(args, kwargs))
        known = [t for t in leaves if id(t) in rec._columns]
        tainted = [t for t in leaves if id(t) in rec._tainted]
        if not (known or tainted):
            return func(*args, **kwargs)
        if known and name in _UNWATCHABLE:
            call = next(s.source for s in rec._columns[id(known[0])][1] if s.source is not None)
            raise RuntimeError(f"hnca: the sample of call {call.index} ({type(call.layer).__name__}) is read through "
                               f".{name} inside record(): writes through it bypass the record's in-place check, so "
                               "the estimate could be silently wrong; use .detach() (or .tolist()), or read it after "
                               "the with block")
        versions = [t._version for t in known]
        out = func(*args, **kwargs)
        if isinstance(out, str):  # h.type(): the dtype's name
            return out
        changed = [t for t, v in zip(known, versions) if t._version != v]
        if known and not tainted and not changed and isinstance(out, torch.Tensor):
            if any(out is t for t in known):  # the identity (h.real, h.contiguous() of a contiguous h)
                return out
            if name in _CATS and out.dim() == 2:
                parts = args[0] if args else kwargs["tensors"]
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                if dim in (1, -1) and all(isinstance(p, torch.Tensor) and p.dim() == 2 for p in parts):
                    rec._columns[id(out)] = (out, _concatenated(rec, parts))
                    return out
            if (name in _CONVERSIONS and len(known) == 1 and known[0] is args[0] and out.shape == args[0].shape
                    and _keeps_values(rec._columns[id(args[0])][1], out.dtype)):
                rec._columns[id(out)] = (out, rec._columns[id(args[0])][1])
                return out
        # any other operation: the samples it reads have a path the record cannot follow
        sources = {s.source for t in known for s in rec._columns[id(t)][1] if s.source is not None}
        for call in sources:
            rec._unmodeled(call, f"its sample is read by {_qualname(func)} inside the record")
        for t in changed:  # changed in place: no longer holds the sample (the sample itself: an error later)
            del rec._columns[id(t)]
        for t in tainted:
            sources |= rec._tainted[id(t)][1]
        if sources:
            for t in (*_tensors((out,), {}), *changed):
                rec._tainted[id(t)] = (t, frozenset(sources))
        return out


# Calls that read a tensor's metadata, not its values (methods, and properties by name).
_METADATA = frozenset({
    "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex", "is_signed",
    "element_size", "data_ptr", "get_device", "storage_offset", "__len__", "nelement", "ndimension", "__hash__",
    "requires_grad_", "register_hook", "retain_grad", "is_inference", "has_names", "is_pinned", "is_shared",
    "shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda", "is_cpu",
    "is_sparse", "is_sparse_csr", "is_quantized", "is_meta", "is_mkldnn", "is_nested", "is_xpu", "is_mps",
    "itemsize", "nbytes", "output_nr", "_version", "names", "name", "retains_grad", "_backward_hooks",
})
_CATS = frozenset({"cat", "concat", "concatenate"})
# Conversions that keep the values where the new dtype represents them (checked per call).
_CONVERSIONS = frozenset({"detach", "clone", "contiguous", "to", "type", "float", "double", "half", "bfloat16",
                          "int", "long", "short", "char", "byte", "bool", "cpu", "cuda"})
# Accessors whose writes the watcher cannot see.
_UNWATCHABLE = frozenset({"data", "numpy", "untyped_storage", "storage", "_typed_storage", "__dlpack__"})


def _operation_name(func) -> str:
    """A torch function's name; a property's getter is named by the property (``.T``: "T")."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _qualname(func) -> str:
    name = _operation_name(func)
    if getattr(func, "__name__", "") == "__get__":
        return f"Tensor.{name}"
    return getattr(func, "__qualname__", name or repr(func))


_EXACT: dict = {}


def _keeps_values(segments, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds every value the samples in ``segments`` can take (0/1, -1/+1, a class)."""
    for s in segments:
        if s.source is None:
            continue  # context columns may change: they are not samples
        values = s.source.layer.sample_values
        key = (values, dtype)
        if key not in _EXACT:
            exact = torch.tensor(values, dtype=torch.float64)
            _EXACT[key] = dtype.is_complex or bool((exact.to(dtype).to(torch.float64) == exact).all())
        if not _EXACT[key]:
            return False
    return True


def _tensors(args, kwargs):
    """The tensors among the arguments, and inside list or tuple arguments (torch.cat's list)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    yield t


def _concatenated(rec: "Record", parts) -> tuple:
    segments, start = [], 0
    for part in parts:
        width = part.shape[-1]
        known = rec._columns.get(id(part))
        if known is None:
            segments.append(Segment(start, start + width, None))
        else:
            segments.extend(Segment(start + s.start, start + s.stop, s.source) for s in known[1])
        start += width
    return tuple(segments)


class Record:
    """The calls of stochastic layers made inside ``with record():``, and the estimators on them.

    Create it with ``hnca_kernels.record()``. ``calls`` lists the recorded calls in order; a call's
    ``children`` are the later calls that took its sample as input.

    Args:
        strict: raise where a unit would fall back to REINFORCE (see ``fallbacks``).
        replay: samples to use instead of drawing, one per sampled call in call order (tensors of
            each call's sample shape; None: draw that one), to replay a run or enumerate
            configurations. Scored calls take their given values.
        relax: ``"gumbel_st"`` or ``"reinmax"``: every sampled call returns a straight-through
            sample (an exact draw whose gradient is the relaxed one, ``hnca_kernels.relaxed``), for
            ``elbo_loss(estimator=relax)``; ``tau`` is its temperature.
    """

    def __init__(self, *, strict: bool = False, replay: Sequence[torch.Tensor] | None = None,
                 relax: str | None = None, tau: float = 1.0):
        if relax is not None:
            relaxed._check(relax, tau)
            if replay is not None:
                raise ValueError("record(relax=...) draws its own relaxed samples: replay= does not apply")
        self.strict = bool(strict)
        self.relax, self.tau = relax, float(tau)
        self.calls: list[StochasticCall] = []
        self._replay = list(replay) if replay is not None else None
        self._sampled = 0   # sampled calls so far (the replay's index)
        self.branch = None  # a partial pass: only calls that depend on this sampled call are computed
        self._columns: dict[int, tuple] = {}  # id(tensor) -> (tensor, segments): samples and their cat/copies
        self._tainted: dict[int, tuple] = {}  # id(tensor) -> (tensor, calls): computed from samples otherwise
        self._state = "new"
        self._scores = None
        self._watcher = None
        self._token = None

    # ------------------------------------------------------------------ recording
    def __enter__(self) -> "Record":
        if self._state != "new":
            raise RuntimeError("a record can be entered once; use a new hnca_kernels.record() for each forward")
        self._state = "open"
        if torch.compiler.is_compiling():
            _TRACED.append(self)
        else:
            self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
            _EAGER.append(self)
            self._watcher = _Watcher(self)
            self._watcher.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._state = "closed"
        if torch.compiler.is_compiling():
            _TRACED.remove(self)
        else:
            self._watcher.__exit__(*exc)
            _ACTIVE.reset(self._token)
            _EAGER.remove(self)
            self._watcher = self._token = None
        self._columns, self._tainted = {}, {}  # nothing is watched after the block

    def _unmodeled(self, call: StochasticCall, reason: str) -> None:
        if self.strict:
            raise RuntimeError(f"record(strict=True): call {call.index} ({type(call.layer).__name__}): {reason}; "
                               "HNCA cannot credit it (see hnca_kernels.record's documentation)")
        if reason not in call.unmodeled:
            call.unmodeled.append(reason)

    def _branch_position(self, parts, value) -> str:
        """In a partial pass from sampled call ``branch``: "upstream" (skipped: a sampled call returns
        its replayed sample), "branch" (the call itself: its replayed sample, nothing computed) or
        "downstream" (it depends on the branch: it runs as usual)."""
        if value is None and self._sampled <= self.branch:
            return "upstream" if self._sampled < self.branch else "branch"
        tensors = (*parts, value) if value is not None else parts
        return "downstream" if any(id(t) in self._columns or id(t) in self._tainted for t in tensors) else "upstream"

    def _branch_call(self, layer, parts, value, position):
        if value is not None:
            return value
        if not self._replays_next():
            raise ValueError(f"a partial pass replays every sampled call its branch does not reach; "
                             f"sampled call {self._sampled} has no sample")
        sample = self._replay[self._sampled]
        if position == "branch":  # registered (later calls depend on it) without logits: only its sample is used
            self._register(layer, (), None, None, sample)
        else:
            self._sampled += 1
        return sample

    def _replays_next(self) -> bool:
        """Whether the next sampled call takes a replayed sample (else it draws)."""
        index = self._sampled
        if index >= len(self._replay):
            raise ValueError(f"record(replay=...) holds {len(self._replay)} samples but sampled call {index} needs one")
        return self._replay[index] is not None

    def _replayed(self, layer, logits) -> torch.Tensor:
        index = self._sampled
        return layer.check_sample(self._replay[index], logits, f"replay[{index}]")

    def _register(self, layer, parts, inputs, logits, sample, observed=None) -> None:
        segments = _concatenated(self, parts)
        compiling = torch.compiler.is_compiling()  # _version is not traceable
        call = StochasticCall(len(self.calls), layer, inputs, segments, logits, sample,
                              version=0 if compiling else sample._version,
                              weight_version=0 if compiling else layer.weight._version,
                              observed=observed is not None)
        for source in {s.source for s in segments if s.source is not None}:
            source.children.append(call)
        tainted = set()
        for part in parts:  # inputs computed from samples by operations the record cannot follow
            for source in self._tainted.get(id(part), (None, ()))[1]:
                tainted.add(source)
                source.feeds_unmodeled = True
                self._unmodeled(source, f"its sample reaches call {call.index} ({type(layer).__name__}) through "
                                        "operations the record cannot follow")
        if observed is None:
            self._sampled += 1
            self._columns[id(sample)] = (sample, (Segment(0, sample.shape[-1], call),))
        else:
            self._register_value(call, observed, tainted)
        call.tainted_by = frozenset(tainted)
        self.calls.append(call)

    def _register_value(self, call: StochasticCall, value: torch.Tensor, tainted: set) -> None:
        """A scored call's value: data, a sampled call's sample (its value-parent), or something the
        record cannot follow (its sources then fall back)."""
        layer = call.layer
        known = self._columns.get(id(value))
        if known is not None and len(known[1]) == 1 and known[1][0].source is not None \
                and (known[1][0].start, known[1][0].stop) == (0, value.shape[-1]):
            source = known[1][0].source
            if _same_kind(source.layer, layer):
                call.value_source = source
                source.value_of.append(call)
                if source in call.parents:  # its own component moves with its inputs: no one message
                    self._unmodeled(source, f"call {call.index} scores its sample given the sample itself")
                return
            raise ValueError(f"call {call.index} ({type(layer).__name__}) scores the sample of call {source.index} "
                             f"({type(source.layer).__name__}), a different kind of unit: a value-parent must have the "
                             "scoring layer's units (the same Bernoulli values, or the same variables and classes)")
        sources = set(self._tainted.get(id(value), (None, ()))[1])
        if known is not None:
            sources |= {s.source for s in known[1] if s.source is not None}
        for source in sources:
            tainted.add(source)
            self._unmodeled(source, f"its sample reaches the value of call {call.index} ({type(layer).__name__}) "
                                    "through operations the record cannot follow")
        layer.require_values(call.sample)

    # ---------------------------------------------------------------- estimators
    @property
    def sampled_calls(self) -> list:
        """The calls that drew their sample (the units an estimator trains)."""
        return [c for c in self.calls if not c.observed]

    @property
    def scored_calls(self) -> list:
        """The calls made with ``observed=``: the objective's components (``elbo``)."""
        return [c for c in self.calls if c.observed]

    @property
    def fallbacks(self) -> dict:
        """{call: reasons} for the calls HNCA cannot credit (they get REINFORCE)."""
        return {c: list(c.unmodeled) for c in self.calls if c.unmodeled}

    def _check_usable(self) -> None:
        if self._state == "open":
            raise RuntimeError("the record is still open: call surrogate_loss after the `with record()` block")
        if not self.calls:
            raise RuntimeError("the record holds no stochastic layer call: call the model inside `with record():` "
                               "(under torch.compile, compile the whole step, not the model alone)")
        if not any(c.logits.requires_grad for c in self.calls):
            raise RuntimeError("the recorded forward ran with gradients disabled (torch.no_grad) or on frozen "
                               "parameters; run it with grad enabled")
        for c in () if torch.compiler.is_compiling() else self.calls:
            if c.sample._version != c.version:
                raise RuntimeError(f"the sample of call {c.index} ({type(c.layer).__name__}) was modified in place "
                                   "after it was drawn; copy it (h.clone()) before changing it")
            # a child's weight enters its parents' messages (a parent-less call's weight, autograd checks)
            if c.layer.weight._version != c.weight_version and any(s.source is not None for s in c.segments):
                raise RuntimeError(f"the weight of call {c.index} ({type(c.layer).__name__}) was changed in place "
                                   "after the forward (an optimizer step between the forward and its loss?): the "
                                   "messages would use the new weight; compute each record's loss before "
                                   "optimizer.step()")

    def log_ratios(self, backend: str | None = None) -> list:
        """Per call, the children's counterfactual log-ratio summed over its child calls (None for a
        call without children): d [B, out] for Bernoulli units, D [B, V, K] for categorical ones
        (log P(children | variable v := k) - log P(children | actual sample))."""
        self._check_usable()
        incoming: list = [None] * len(self.calls)
        with torch.no_grad():
            for child in self.sampled_calls:
                for parent, columns in _parents_of(child).items():
                    message = _message(parent, child, columns, backend)
                    incoming[parent.index] = message if incoming[parent.index] is None else incoming[parent.index] + message
        return incoming

    def surrogate_loss(self, reward: torch.Tensor, estimator: str = "hnca", baseline=0.0, backend: str | None = None,
                       outputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """A scalar whose ``.backward()`` writes the estimate of -grad E[R] (batch mean) into ``.grad``.

        Args:
            reward: float tensor [B], one reward per example (not differentiated).
            estimator: ``"hnca"`` (HNCA for every unit with recorded children, REINFORCE for the
                others) or ``"reinforce"`` (REINFORCE for every unit).
            baseline: a float or a tensor [B] (or scalar) subtracted from the reward; it must not
                depend on the current samples (e.g. ``MovingAverageBaseline`` of earlier batches).
            backend: backend of the message pass (default: ``use_backend``'s, else automatic).
            outputs: samples of units with children that the reward also reads directly; those
                units get REINFORCE (HNCA would be biased for them).

        The value equals -mean(reward); only its gradient carries the estimate.
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.relax is not None:
            raise ValueError(f"a record(relax={self.relax!r}) is for elbo_loss(estimator={self.relax!r}): a reward has "
                             "no gradient to pass through the relaxed samples")
        batch = self._batch()
        sampled = self.sampled_calls
        for t in outputs:
            found = [c for c in sampled if c.sample is t]
            if not found:
                raise ValueError("outputs= must hold samples of calls in this record (the tensors the layers returned)")
            for call in found:
                if call.children:
                    self._unmodeled(call, "the reward reads its sample directly (outputs=)")
        device = self.calls[-1].logits.device
        signal = learning_signal(reward, baseline, batch, device)
        d = self.log_ratios(backend) if estimator == "hnca" else [None] * len(self.calls)
        with torch.no_grad():
            scores = []
            for call in sampled:
                logits, message = call.logits.detach(), d[call.index]
                # a sample scored by a call (an input or the value of layer(..., observed=)) reaches
                # the reward only if the reward reads those log-probabilities: a path HNCA's reward
                # messages do not follow
                scored = any(c.observed for c in call.children) or call.value_of
                if message is not None and not call.unmodeled and not scored:
                    score = call.layer.credit(logits, message, backend)
                else:
                    score = call.layer.score(logits, call.sample)
                scores.append(score.mul_(signal.to(score.dtype).view(-1, *([1] * (score.dim() - 1)))))
            mean_reward = reward.detach().to(scores[-1].dtype).mean()
        self._scores = list(zip(sampled, scores))
        if estimator == "hnca" and not torch.compiler.is_compiling():
            _warn_fallbacks(self)
        return _SurrogateLoss.apply(mean_reward, tuple(scores), *(c.logits for c in sampled))

    def _batch(self, estimate: bool = True) -> int:
        """The batch every call holds, after the checks every estimator needs (``estimate``: also
        that the forward ran with gradients)."""
        if estimate:
            self._check_usable()
        elif self._state != "closed" or not self.calls:
            self._check_usable()
        batch = self.calls[0].logits.shape[0]
        for c in self.calls:
            if c.logits.shape[0] != batch:
                raise ValueError(f"every recorded call must hold the same batch: call 0 has {batch} examples, "
                                 f"call {c.index} has {c.logits.shape[0]}")
        if batch == 0:
            raise ValueError("the recorded batch is empty (B = 0): there is nothing to estimate from")
        return batch

    def elbo(self) -> torch.Tensor:
        """The objective per example [B], f = sum of the scored calls' log-probabilities of their
        values + sum of the sampled calls' analytic entropies (paper Eq. 7; for a VAE the ELBO), with
        autograd history (exact in the scored layers' parameters and in the entropies)."""
        from .objective import objective

        self._batch(estimate=False)
        if not self.scored_calls:
            raise RuntimeError("the record holds no scored call (layer(..., observed=value)): the objective is "
                               "the sum of their log-probabilities and the sampled calls' entropies")
        return objective(self)

    def elbo_loss(self, estimator: str = "hnca", baseline=None, backend: str | None = None, **ablations):
        """A scalar equal to -mean ``elbo()`` whose ``.backward()`` writes the estimate of
        -grad E[f] into every ``.grad``: f-HNCA (``"hnca"``) or REINFORCE with each call's downstream
        sum (``"reinforce"``) for the sampled calls, exact autograd for the scored calls' parameters;
        ``"gumbel_st"``/``"reinmax"`` for a ``record(relax=...)`` (biased). See
        ``hnca_kernels.objective.elbo_loss`` for the arguments."""
        from .objective import elbo_loss

        return elbo_loss(self, estimator, baseline=baseline, backend=backend, **ablations)

    def _by_layer(self):
        """Per layer (a layer called several times is one set of parameters): its calls' inputs,
        their logit gradients of the last ``surrogate_loss`` [B, outputs], and whether it has a bias."""
        if self._scores is None:
            raise RuntimeError("gradient statistics need a surrogate_loss or elbo_loss call first")
        scores = self._scores() if callable(self._scores) else self._scores
        by_layer: dict = {}
        for call, score in scores:
            inputs, grads, _ = by_layer.setdefault(id(call.layer), ([], [], call.layer.bias is not None))
            inputs.append(call.inputs)
            grads.append(score.flatten(1))
        return by_layer.values()

    def gradient_variance(self, as_tensor: bool = False):
        """Mean over the stochastic layers' parameters of the per-parameter variance, over the batch's
        examples, of the per-example estimate of the last ``surrogate_loss`` (the paper's "mean
        gradient variance"; deterministic modules are not included). A layer called several times
        is one set of parameters: its per-example gradient sums over the calls. ``as_tensor``: a
        float64 tensor on the model's device (no host synchronisation) instead of a float."""
        total, count = 0.0, 0
        for inputs, grads, bias in self._by_layer():
            t, c = linear_gradient_variance(inputs, grads, bias=bias)
            total, count = total + t, count + c
        return total / count if as_tensor else float(total) / count

    def gradient_square_sum(self) -> tuple:
        """(sum over the batch's examples of the squared norm of the per-example estimate over the
        stochastic layers' parameters, a float64 tensor; the number of parameters): the part of the
        gradient variance that adds over a split of the batch among processes
        (``metrics.linear_gradient_square_sum``)."""
        total, count = 0.0, 0
        for inputs, grads, bias in self._by_layer():
            t, c = linear_gradient_square_sum(inputs, grads, bias=bias)
            total, count = total + t, count + c
        return total, count

    def __repr__(self) -> str:
        return f"Record({self._state}, calls={self.calls})"


def _warn_fallbacks(rec: Record) -> None:
    """Say once per distinct structure which units HNCA could not credit (they got REINFORCE)."""
    reasons = [f"call {c.index} ({type(c.layer).__name__}): {'; '.join(c.unmodeled)}"
               for c in rec.sampled_calls if c.unmodeled and (c.children or c.feeds_unmodeled or c.value_of)]
    if reasons:
        warnings.warn("hnca: these units get REINFORCE instead of HNCA (unbiased, more variance): "
                      + " | ".join(reasons) + " (see Record.fallbacks)", stacklevel=3)


def _parents_of(child: StochasticCall) -> dict:
    """{parent call: list of (start, stop) column ranges of the child's input that hold its sample}."""
    parents: dict = {}
    for s in child.segments:
        if s.source is not None:
            parents.setdefault(s.source, []).append((s.start, s.stop))
    return parents


def _columns_of(parent: StochasticCall, child: StochasticCall, columns, dtype) -> torch.Tensor:
    """The child's weight columns that take the parent's sample (summed where it takes it twice)."""
    weight = child.layer.weight.detach()
    start, stop = columns[0]
    cols = weight[:, start:stop]
    for start, stop in columns[1:]:
        cols = cols + weight[:, start:stop]
    return cols.to(dtype)  # under autocast the logits can be in a lower precision


def _message(parent: StochasticCall, child: StochasticCall, columns, backend, target=None) -> torch.Tensor:
    """The log-ratio the child call sends the parent call at ``target`` (default: the child's
    sample, or a scored child's value), through the child's weight columns of the parent's sample."""
    logits = child.logits.detach()
    w, l, y, _ = child.layer.child_view(_columns_of(parent, child, columns, logits.dtype), logits,
                                       child.sample if target is None else target)
    return parent.layer.parent_message(parent.sample, w, l, y, backend)


def _message_and_entropy(parent: StochasticCall, child: StochasticCall, columns, backend):
    """A sampled child's log-ratio at its sample (``_message``) and the change of its entropy when the
    parent's units switch (f-HNCA's green term), in one call to the layer (a backend may fuse them)."""
    logits = child.logits.detach()
    w, l, y, classes = child.layer.child_view(_columns_of(parent, child, columns, logits.dtype), logits,
                                             child.sample)
    return parent.layer.parent_message_and_entropy_delta(parent.sample, w, l, y, classes, backend)


def record(*, strict: bool = False, replay: Sequence[torch.Tensor] | None = None, relax: str | None = None,
           tau: float = 1.0) -> Record:
    """Record the stochastic layer calls of a forward pass; see ``hnca_kernels.record`` (module docs).

    >>> with hnca_kernels.record() as rec:
    ...     action = model(x)
    >>> rec.surrogate_loss((action == label).float(), baseline=b).backward()
    """
    return Record(strict=strict, replay=replay, relax=relax, tau=tau)


def _same_kind(a: nn.Module, b: nn.Module) -> bool:
    """Whether a sample of layer ``a`` is a value of layer ``b`` unit by unit."""
    if type(a) is not type(b):
        return False
    if hasattr(a, "values"):
        return a.values == b.values and a.out_features == b.out_features
    return (a.num_variables, a.num_classes, a.one_hot) == (b.num_variables, b.num_classes, b.one_hot)


def _unwatched(records: tuple):
    """Run a layer's own torch operations without the records' watchers (they are not paths)."""
    if not records or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()


class _SurrogateLoss(torch.autograd.Function):
    """Value -mean(R); gradient -score_k / B with respect to each call's logits_k.

    The same as ``C - sum_k (logits_k * score_k).sum() / B - mean(R)`` with C its detached value,
    without building that graph of small ops and backward nodes; one finiteness check of the
    learning signal covers every score (benchmarks/RESULTS.md has what both saved).
    """

    @staticmethod
    def forward(ctx, mean_reward, scores, *logits):
        ctx.save_for_backward(*scores)
        return mean_reward.neg()

    @staticmethod
    def backward(ctx, grad):
        scores = ctx.saved_tensors
        factor = grad / -scores[0].shape[0]
        return (None, None, *(score * factor.to(score.dtype) for score in scores))


def learning_signal(reward, baseline, batch: int, device) -> torch.Tensor:
    """reward - baseline [B], after checking both (one finiteness check of the difference)."""
    if not isinstance(reward, torch.Tensor):
        raise TypeError(f"reward must be a tensor of shape [{batch}], got {type(reward).__name__}")
    if reward.shape != (batch,):
        raise ValueError(f"reward must have shape [{batch}] (one per example), got {tuple(reward.shape)}")
    if not reward.is_floating_point():
        raise TypeError(f"reward must be a floating tensor, got {reward.dtype}")
    if reward.device != device:
        raise ValueError(f"reward is on {reward.device} but the model's outputs are on {device}")
    if reward.requires_grad and not torch.compiler.is_compiling():
        warnings.warn("hnca: the reward requires grad; the estimators treat it as a number (it is detached), so "
                      "no gradient flows through it: for an objective of the model's parameters, add its own loss "
                      "(or use Record.elbo_loss for a known objective)", stacklevel=3)
    reward = reward.detach()
    if isinstance(baseline, torch.Tensor):
        if baseline.shape not in ((), (batch,)):
            raise ValueError(f"baseline must be a float or a tensor of shape [{batch}], got {tuple(baseline.shape)}")
        baseline = baseline.detach().to(reward)
    elif not isinstance(baseline, (int, float)):
        raise TypeError(f"baseline must be a float or a tensor, got {type(baseline).__name__}")
    elif baseline != baseline or abs(baseline) == float("inf"):
        raise ValueError(f"baseline must be finite, got {baseline}")
    signal = reward - baseline
    if validation.current_mode(signal.device) != "host":  # one device-side check of the difference
        validation.require(signal.device, lambda: torch.isfinite(signal).all(),
                       ValueError("reward - baseline holds non-finite values (nan or inf)"))
    elif not torch.isfinite(signal).all():  # one check of the difference; on failure, say which is bad
        if not torch.isfinite(reward).all():
            raise ValueError("reward holds non-finite values (nan or inf)")
        if isinstance(baseline, torch.Tensor) and not torch.isfinite(baseline).all():
            raise ValueError("baseline holds non-finite values (nan or inf)")
        raise ValueError("reward - baseline overflows (inf)")
    return signal
