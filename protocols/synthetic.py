"""Class catalogue of the embedded synthetic dataset (protocols.md): pure data, no generation here.

Synthetic class ``k`` (native id k, 1..K, 0 = void) is one combination of shape x colour x texture.
The first ten classes differ in both shape and colour with a solid fill, the next ten reuse the shapes
with shifted colours and stripes, and so on, so that any K <= 150 classes are pairwise distinct and the
small default (K = 20) is learnable by a tiny model on a CPU. The generator in
``benchmark.data.synth`` draws exactly these appearances; names are derived from the same triple.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "star", "bar", "crescent", "hexagon")
# RGB triples, saturated and far apart in colour space.
COLOURS = (
    ("red", (220, 40, 40)),
    ("green", (40, 190, 60)),
    ("blue", (40, 80, 230)),
    ("yellow", (240, 220, 40)),
    ("magenta", (220, 50, 220)),
    ("cyan", (40, 220, 230)),
    ("orange", (250, 140, 20)),
    ("purple", (130, 50, 200)),
    ("white", (245, 245, 245)),
    ("black", (20, 20, 20)),
)
TEXTURES = ("solid", "striped", "dotted", "checkered", "gradient")
MAX_CLASSES = 150
DEFAULT_CLASSES = 20


@dataclass(frozen=True)
class SynthClass:
    id: int
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}" if self.texture == "solid" else f"{self.texture} {self.colour} {self.shape}"


def synth_class(class_id: int) -> SynthClass:
    """The appearance of synthetic class ``class_id`` (1-based)."""
    if not 1 <= class_id <= MAX_CLASSES:
        raise ValueError(f"synthetic class ids are 1..{MAX_CLASSES}, got {class_id}")
    k = class_id - 1
    shape = k % len(SHAPES)
    block = k // len(SHAPES)                      # 0..14
    # blocks with the same texture (b, b + 5, b + 10) get colour shifts 16 and 32 apart: never equal.
    colour = (k + 3 * block + block // len(TEXTURES)) % len(COLOURS)
    texture = block % len(TEXTURES)
    name, rgb = COLOURS[colour]
    return SynthClass(class_id, SHAPES[shape], name, rgb, TEXTURES[texture])


def synth_classes(num_classes: int = DEFAULT_CLASSES) -> tuple[SynthClass, ...]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the synthetic dataset has 1..{MAX_CLASSES} classes, got {num_classes}")
    return tuple(synth_class(i) for i in range(1, num_classes + 1))


# ---- 'stuff' of the panoptic variant (synth-pan) ----------------------------------------------------
# Amorphous regions with a muted colour and a texture of their own, unlike any thing's saturated fill:
# (name, RGB, texture) with texture one of "noise", "waves", "blotches", "smooth".
STUFF_LOOKS = (
    ("grass", (95, 140, 70), "noise"),
    ("sky", (125, 165, 215), "smooth"),
    ("sand", (205, 185, 130), "blotches"),
    ("rock", (115, 110, 105), "waves"),
    ("water", (60, 95, 140), "waves"),
    ("soil", (120, 85, 55), "noise"),
    ("snow", (225, 228, 232), "smooth"),
    ("brick", (160, 75, 60), "blotches"),
)
PANOPTIC_STUFF_FRACTION = 5     # synth-pan: one class in five is stuff (K = 20 -> 4 stuff, 16 things)


def default_stuff_classes(num_classes: int) -> int:
    """How many of the K classes of ``synth-pan`` are stuff: K // 5 (at least 1, at most len(STUFF_LOOKS))."""
    return max(1, min(len(STUFF_LOOKS), num_classes // PANOPTIC_STUFF_FRACTION))


def stuff_ids(num_classes: int, num_stuff: int) -> tuple[int, ...]:
    """The stuff class ids among 1..K, spread evenly so that every split has stuff in its base and its
    increments as ADE20K panoptic has (K = 20, 4 stuff: 5, 10, 15, 20)."""
    if not 0 <= num_stuff < num_classes or num_stuff > len(STUFF_LOOKS):
        raise ValueError(f"{num_stuff} stuff classes among {num_classes} (at most {len(STUFF_LOOKS)}, fewer than K)")
    return tuple(round(num_classes * (j + 1) / num_stuff) for j in range(num_stuff)) if num_stuff else ()


def stuff_look(num_classes: int, num_stuff: int, class_id: int) -> tuple[str, tuple[int, int, int], str]:
    """(name, RGB, texture) of stuff class ``class_id`` of a K-class synth-pan dataset."""
    return STUFF_LOOKS[stuff_ids(num_classes, num_stuff).index(class_id)]
