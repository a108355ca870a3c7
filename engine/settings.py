"""`SampleSettings`, a sampler and its settings, and `FIELDS`, the one table of the sampling fields.

Every front end takes its sampling settings from this table: `ddpm-engine sample`'s flags
(engine/apps/cli.py), the fields of the server's requests (engine/apps/serve.py), and the engine
itself, which checks a request's settings before it joins a batch (engine/core.py). The defaults are
`SampleSettings`' and nowhere else. A value a field refuses is a `FieldError` that names the field;
each front end spells the name its own way (`--steps` on the command line, `steps` in JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from engine.config import DiffusionConfig, ModelConfig
from engine.errors import ConfigError
from engine.noise import MASK32
from engine.sampler import SAMPLERS, SPACINGS, VARIANCES, SamplerPlan, ddim_plan, ddpm_plan, dpm_solver_plan

DDIM_STEPS = 50  # DDIM's default number of steps; DDPM takes all T by default
# DPM-Solver++(2M)'s: its paper's guided samples converge in 15-20 steps; on the bundled model 15 steps
# scored the FID of 20 steps and of DDIM-50 (docs/sampling.md has the measurement).
DPM_STEPS = 15
# Dynamic thresholding's percentile (Imagen's 0.995), on by default: it lowered the bundled model's FID
# at every guidance scale tried (the model card's thresholding table).
THRESHOLD = 0.995
MAX_GUIDANCE = 100.0  # far past any useful scale (papers use up to ~10); beyond it images saturate to garbage
MAX_ETA = 1e3         # DDIM's eta past 1 only adds noise beyond DDPM's; this bound keeps the noise finite


@dataclass(frozen=True)
class SampleSettings:
    """A sampler and its settings. The defaults here are every tool's defaults."""

    sampler: str = "dpm++2m"        # "ddpm" (ancestral), "ddim" or "dpm++2m" (the default: docs/sampling.md)
    steps: int | None = None        # None: all T steps for DDPM, DDIM_STEPS for DDIM, DPM_STEPS for DPM-Solver++
    eta: float = 0.0                # DDIM only: 0 deterministic, 1 DDPM-like noise
    variance: str = "large"         # DDPM only: "large" (sigma^2 = beta) or "small" (posterior)
    spacing: str = "linspace-t0"    # which timesteps (see timestep_sequence and, for dpm++2m, solver_timesteps)
    guidance: float = 1.8           # w in (1 + w) eps(x, c) - w eps(x, null); 0: purely conditional
    clip_x0: bool = False           # clip the predicted x_0 to [-1, 1] at each step
    threshold: float = THRESHOLD    # dynamic thresholding's percentile p of |x_0| (bound_x0); 0: off
    # Guidance only at noise levels sigma_t in (lo, hi] (Kynkäänniemi et al. 2024), sigma_t = sqrt((1 -
    # ab_t) / ab_t) as in their EDM notation; a step outside adds no unconditional row. None: every step.
    guidance_interval: tuple[float, float] | None = None

    def guided_at(self, sigma: float) -> bool:
        """Whether a step at noise level sigma is guided."""
        if self.guidance == 0:
            return False
        return self.guidance_interval is None or self.guidance_interval[0] < sigma <= self.guidance_interval[1]

    def num_steps(self, num_timesteps: int) -> int:
        """The steps this sampler takes on a model with T = num_timesteps."""
        default = {"ddpm": num_timesteps, "dpm++2m": DPM_STEPS}.get(self.sampler, DDIM_STEPS)
        steps = self.steps or default
        if self.steps is not None and self.steps > num_timesteps:
            raise FieldError("steps", f"{shown(self.steps)} exceeds the model's T = {num_timesteps}")
        return min(steps, num_timesteps)

    def plan(self, diffusion: DiffusionConfig, device: torch.device | str = "cpu") -> SamplerPlan:
        steps = self.num_steps(diffusion.num_timesteps)
        match self.sampler:
            case "ddpm":
                plan = ddpm_plan(diffusion, steps, self.variance, self.spacing)
            case "ddim":
                plan = ddim_plan(diffusion, steps, self.eta, self.spacing)
            case "dpm++2m":
                plan = dpm_solver_plan(diffusion, steps, self.spacing)
            case _:
                raise FieldError("sampler", f"unknown sampler {self.sampler!r}; use {', '.join(SAMPLERS)}")
        return plan.to(device)

    def check(self, num_timesteps: int | None = None) -> SampleSettings:
        """Every field against FIELDS (its type too: settings made in code are checked as strictly as
        parsed ones), and the steps against the model's T when given; returns self."""
        for field in fields(self):
            FIELDS[field.name].check(getattr(self, field.name))
        if num_timesteps is not None:
            self.num_steps(num_timesteps)
        return self


class FieldError(ConfigError):
    """A value a sampling field refuses: `field` its name, `problem` what is wrong, without the name
    (each front end puts its own spelling of the name in front)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class Field:
    """A sampling field: a value of `kind` (int, float, str or bool); a number from lo to hi (None: no
    bound), a string one of `choices`; None only where `optional` (then it means "the default that
    depends on the model or the sampler"). `help` is the flag's and the API's description."""

    name: str
    kind: type
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False

    @property
    def default(self):
        return getattr(SampleSettings(), self.name) if self.name in SETTINGS else None

    def check(self, value: object) -> object:
        """`value` when it is one of this field's; else FieldError. Strict: a bool is not a number, a
        float not an integer, a string not a number; NaN, infinities and out-of-range numbers are refused."""
        if value is None:
            if self.optional:
                return None
            raise FieldError(self.name, f"must be {self.described()}, not null")
        if self.kind is bool:
            if type(value) is not bool:
                raise FieldError(self.name, f"must be true or false, not {shown(value)}")
            return value
        if self.kind is tuple:  # an interval (lo, hi] of numbers, lo < hi
            if type(value) not in (list, tuple) or len(value) != 2:
                raise FieldError(self.name, f"must be two numbers [lo, hi], not {shown(value)}")
            lo, hi = (Field(self.name, float, self.help, self.lo, self.hi).check(v) for v in value)
            if not lo < hi:
                raise FieldError(self.name, f"needs lo < hi, not {lo:g}, {hi:g}")
            return (lo, hi)
        if self.kind is str:
            if type(value) is not str or value not in self.choices:
                raise FieldError(self.name, f"unknown {self.name} {shown(value)}; use {', '.join(self.choices)}")
            return value
        if self.kind is int and type(value) is not int:
            raise FieldError(self.name, f"must be an integer, not {shown(value)}")
        if self.kind is float:
            if type(value) not in (int, float):
                raise FieldError(self.name, f"must be a number, not {shown(value)}")
            try:
                value = float(value)
            except OverflowError:  # an integer past the floats
                raise FieldError(self.name, f"{shown(value)} is out of range {self.interval()}") from None
            if not math.isfinite(value):
                raise FieldError(self.name, f"{value} is not a finite number")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise FieldError(self.name, f"{value:g} is out of range {self.interval()}" if self.kind is float
                             else f"{shown(value)} is out of range {self.interval()}")
        return value

    def parse(self, text: str) -> object:
        """A command-line value: ASCII decimal digits for an integer (int() would take '١٢', '1_000'
        and ' 5 '), a finite decimal for a float; then `check`."""
        if self.kind is int:
            body = text[1:] if text[:1] in "+-" else text
            if not (body.isascii() and body.isdigit()) or len(body) > 40:
                raise FieldError(self.name, f"{shown(text)} is not an integer")
            return self.check(int(text))
        if self.kind is tuple:
            if text.strip().lower() == "none":
                return self.check(None)
            parts = text.split(",")
            if len(parts) != 2:
                raise FieldError(self.name, f"{shown(text)} is not LO,HI")
            return self.check(tuple(Field(self.name, float, self.help).parse(part.strip()) for part in parts))
        if self.kind is float:
            if not text.isascii() or "_" in text:
                raise FieldError(self.name, f"{shown(text)} is not a number")
            try:
                number = float(text)
            except ValueError:
                raise FieldError(self.name, f"{shown(text)} is not a number") from None
            return self.check(number)
        return self.check(text)

    def described(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"one of {', '.join(self.choices)}"
        if self.kind is tuple:
            return f"two numbers [lo, hi] in {self.interval()}"
        return f"{'an integer' if self.kind is int else 'a number'} in {self.interval()}"

    def interval(self) -> str:
        number = (lambda x: str(x)) if self.kind is int else (lambda x: f"{x:g}")
        lo = "-inf" if self.lo is None else number(self.lo)
        hi = "inf" if self.hi is None else number(self.hi)
        return f"[{lo}, {hi}]"


def shown(value: object) -> str:
    """A value in an error line: its repr, cut short (a message never echoes a whole request back)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# The one table of sampling fields. Ranges here are what any model accepts; what depends on the
# model (steps <= T, guidance 0 for a model without a null class) is checked against it
# (`SampleSettings.check`, `resolve_guidance`).
FIELDS = {field.name: field for field in (
    Field("sampler", str, "the sampler: ddpm (ancestral), ddim, or dpm++2m (DPM-Solver++(2M), multistep)",
          choices=SAMPLERS),
    Field("steps", int, f"sampling steps (default: T for ddpm, {DDIM_STEPS} for ddim, {DPM_STEPS} for dpm++2m)",
          lo=1, optional=True),
    Field("eta", float, "DDIM's eta: 0 deterministic, 1 DDPM's posterior noise", lo=0.0, hi=MAX_ETA),
    Field("variance", str, "DDPM's sigma_t^2: beta_t (large) or the posterior variance (small)", choices=VARIANCES),
    Field("spacing", str, "timestep spacing when steps < T", choices=SPACINGS),
    Field("guidance", float, "guidance scale w in (1 + w) eps(x, c) - w eps(x, null); 0 = purely conditional "
          "(0 for a model without a learned null class, e.g. an unconditional one)",
          lo=0.0, hi=MAX_GUIDANCE),
    Field("clip_x0", bool, "clip the predicted x_0 to [-1, 1] at each step"),
    Field("threshold", float, "dynamic thresholding (Imagen): at each step s = max(1, the P-quantile of |x_0| of "
          "the image), x_0 -> clip(x_0, -s, s) / s; 0 turns it off", lo=0.0, hi=1.0),
    Field("guidance_interval", tuple, "guide only the steps whose noise level sigma_t = sqrt((1 - ab_t) / ab_t) is "
          "in (LO, HI] (Kynkäänniemi et al. 2024: guidance is harmful at high noise and useless at low); a step "
          "outside makes no unconditional U-Net call; none: every step", lo=0.0, hi=1e6, optional=True),
    Field("seed", int, "run seed: image i has the noise of (seed, i)", lo=0, hi=MASK32),
)}
SETTINGS = tuple(f.name for f in fields(SampleSettings))  # the fields that are SampleSettings'; seed is a run's
assert set(SETTINGS) < set(FIELDS)


def resolve_guidance(value: float | None, default: float, config: ModelConfig) -> float:
    """The guidance scale asked for, else the front end's default; a model without a learned null class
    (an unconditional or an imported class-conditional one) has nothing to guide away from: 0, and any
    other scale refused."""
    if config.guidable:
        return default if value is None else value
    if value:
        why = ("this model is unconditional" if config.num_classes == 0
               else "this model has no learned null class (an imported class-conditional model)")
        raise FieldError("guidance", f"must be 0 ({why})")
    return 0.0


def model_classes(picked: str | list | None, config: ModelConfig, class_names: tuple[str, ...],
                  field: str = "classes") -> list[int]:
    """The labels a request names: a comma-separated string (a flag) or a list (JSON) of class names
    or indices (ASCII digits; a JSON integer); None: every class. An unconditional model has one label,
    its null class, and takes no classes."""
    if config.num_classes == 0:
        if picked is not None:
            raise FieldError(field, "this model is unconditional: it has no classes to pick")
        return [config.null_class]
    if picked is None:
        return list(range(len(class_names)))
    items = [item.strip() for item in picked.split(",")] if isinstance(picked, str) else picked
    if not isinstance(items, list) or not items:
        raise FieldError(field, "must be a non-empty list of class names or indices")
    return [class_index(item, class_names, field) for item in items]


def class_index(item: object, class_names: tuple[str, ...], field: str) -> int:
    if type(item) is str and item in class_names:
        return class_names.index(item)
    index = int(item) if type(item) is str and item.isascii() and item.isdigit() and len(item) <= 9 else item
    if type(index) is int and 0 <= index < len(class_names):
        return index
    raise FieldError(field, f"unknown class {shown(item)}; this model has 0..{len(class_names) - 1}: "
                            f"{', '.join(class_names)}")
