"""Streaming variant names: `<precision>-<mode>[+<lever>...]`, e.g. `fp8-compiled+steps3+merge-fused`.

The base (`native`/`fp8` × `eager`/`compiled`) says how the DiT runs; each lever after a `+` switches one of issue
20's §3 speed levers on for that variant only (`bench/suite/levers.py` applies them). Torch-free, so that the
suite's argument parsing and estimates import it on a bare machine.
"""

from __future__ import annotations

from dataclasses import dataclass

BASES = ("native-eager", "native-compiled", "fp8-eager", "fp8-compiled")
LEVERS = {
    "steps3": "3 denoising steps (a deviation from the official 4; avatars.liveavatar.schedule)",
    "steps2": "2 denoising steps (a deviation from the official 4)",
    "stats-bf16": "warmup statistics as bf16 GEMMs with fp32 output (ispa.statistics_precision; bf16 models)",
    "merge-fused": "the LSE merge and its two LSE figures as one compiled function (ispa.fused_merge)",
    "quant-fused": "FP8 activation quantization as one compiled function (avatars.liveavatar.fp8_linear); fp8 bases",
    "decode-gpu1": "the VAE (encode and the streaming decode) on cuda:1, the DiT on cuda:0; needs 2 GPUs",
}
OFFICIAL_STEPS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # "native" or "fp8"
    mode: str  # "eager" or "compiled"
    levers: tuple[str, ...]

    @property
    def base(self) -> str:
        return f"{self.precision}-{self.mode}"

    @property
    def steps(self) -> int:
        """Denoising steps per block under this variant's levers."""
        for lever in self.levers:
            if lever.startswith("steps"):
                return int(lever.removeprefix("steps"))
        return OFFICIAL_STEPS


def parse_variant(name: str) -> Variant:
    """The variant `name` names, or ValueError saying what is wrong with it."""
    base, *levers = name.split("+")
    if base not in BASES:
        raise ValueError(f"unknown streaming variant {name!r}: its base must be one of {', '.join(BASES)}")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise ValueError(f"variant {name!r}: unknown levers {unknown}; choose from {', '.join(LEVERS)}")
    if len(set(levers)) != len(levers) or sum(lever.startswith("steps") for lever in levers) > 1:
        raise ValueError(f"variant {name!r}: a lever is listed twice, or two step counts are")
    precision, mode = base.split("-")
    if "quant-fused" in levers and precision != "fp8":
        raise ValueError(
            f"variant {name!r}: quant-fused quantizes the inputs of FP8 linears; use an fp8 base"
        )
    return Variant(name, precision, mode, tuple(levers))
