"""The shapes world: a seeded visual-question world in which compression visibly matters.

``squint data world DIR`` writes pictures of a few flat shapes (a shape, a colour, a size —
small ones are about one CLIP patch wide — and a position) on a dark ground, sometimes with a
small boxed digit (fine detail that pooling destroys, as OCR in TextVQA), short videos of shapes
moving and blinking, and questions about them with one-word answers, in the formats users
already have:

======================  ======================================================================
``world.json``          what was generated: format, seed, sizes, counts, vocabulary
``scenes.jsonl``        every picture's and video's scene description (the ground truth)
``images/SPLIT/*.png``  the pictures; ``videos/SPLIT/*.mp4`` the videos
``captions.json``       LLaVA pre-training JSON: one dense caption per train picture
``train.json``          LLaVA conversation JSON: a conversation per train picture or video,
                        every question it supports (and its caption) as turns
``words.json``          the train pictures' conversations without pictures: each scene's
                        caption in place of the ``<image>`` tag (text-only instruction data,
                        for an LLM that must first learn the world's questions from words)
``instruct.json``       the training mix: per train picture ``mixes`` conversations of
                        ``turns`` questions each, the families drawn evenly
``instruct_words.json`` the same mix in words, one conversation per scene, for ``words``
                        scenes (the train pictures' and more: words need no picture)
``segments.json``       per train picture its segments (``segments/train/*.png``, pixel
                        ``i`` is ``labels[i - 1]``, 0 the ground) and their labels' words,
                        then pictures drawn for it alone (``images/dense``, ``segments/dense``;
                        ``dense`` of them, three per train picture by default: a tower reading
                        the digits needs far more boxes than the train pictures have, and boxes
                        need no questions)
``val.jsonl``           Squint's evaluation JSONL (``evaluation.datasets``), validation split
``test.jsonl``          the same, test split, balanced across question families
======================  ======================================================================

Question families (the JSONL's ``category``; its ``type`` says how the answer is scored):

- ``attribute`` (exact): "What colour is the small triangle?", "What shape is the red object?"
- ``existence`` (yes/no, balanced as in POPE): "Is there a blue circle in the image?"
- ``count`` (number): "How many squares are there?", "How many red objects are there?"
- ``spatial`` (multiple choice): "Where is the red circle relative to the blue square?" with
  options left / right / above / below, asked only where one axis clearly dominates
- ``detail`` (exact): "Which digit is in the box?"
- ``motion`` (exact, video): "Which way does the red circle move?" (left, right, up or down)
- ``blinks`` (number, video): "How many times does the yellow square appear?"

Every answer follows from the scene description alone (a test recomputes them). A picture's
objects never overlap. Videos last 8 beats of equal length (8 to 32 frames at 8 fps); a blinking
square is shown on whole beats, so any even sampling of 8 frames (or a multiple) sees every
appearance. The same seed writes the same files; each item draws from its own generator seeded
by (seed, split, index), so changing one split's count leaves the other items as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evaluation.questions import CHOICE, EXACT, NUMBER, YESNO

FORMAT = "squint-world/1"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (28, 28, 28)
DIRECTIONS = ("left", "right", "up", "down")
SPATIAL_OPTIONS = ("left", "right", "above", "below")
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the image briefly."
GRID = 24  # LLaVA-1.5's patch grid: object sizes are in patches of ``size / GRID`` pixels
BEATS = 8

# A 5 x 7 bitmap font for the digits: drawn pixel by pixel, so the files do not depend on the
# fonts or the FreeType build of the machine that writes them.
DIGITS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


@dataclass(frozen=True)
class WorldSettings:
    """How much of the world to write. Counts are pictures (and videos) per split."""

    seed: int = 0
    size: int = 336
    train: int = 4000
    val: int = 200
    test: int = 400
    train_videos: int = 400
    val_videos: int = 20
    test_videos: int = 60
    min_objects: int = 3
    max_objects: int = 6
    glyph_share: float = 0.5
    # The training mix: conversations per train picture, questions per conversation, and scenes
    # told in words (None: four per train picture).
    mixes: int = 3
    turns: int = 8
    words: int | None = None
    # Pictures drawn for segments.json alone (None: three per train picture).
    dense: int | None = None

    def __post_init__(self) -> None:
        if self.size < 2 * GRID or self.size % 2:
            raise ValueError(f"size must be an even number of pixels >= {2 * GRID}, not {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError("objects per picture must satisfy 1 <= min_objects <= max_objects <= 8")
        counts = (self.train, self.val, self.test, self.train_videos, self.val_videos, self.test_videos)
        if min(counts) < 0 or any(n is not None and n < 0 for n in (self.words, self.dense)):
            raise ValueError("counts must be >= 0")
        if self.mixes < 1 or self.turns < 1:
            raise ValueError("mixes and turns must be >= 1")

    def pictures(self, split: str) -> int:
        return getattr(self, split)

    def videos(self, split: str) -> int:
        return getattr(self, f"{split}_videos")

    @property
    def word_scenes(self) -> int:
        return 4 * self.train if self.words is None else self.words

    @property
    def dense_pictures(self) -> int:
        return 3 * self.train if self.dense is None else self.dense


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Thing:
    """One shape in a scene: centre and half-extent in pixels."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    extent: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.extent, self.y - self.extent, self.x + self.extent, self.y + self.extent)


@dataclass(frozen=True)
class Glyph:
    """A digit in a small white box."""

    digit: str
    x: int
    y: int
    extent: int


@dataclass(frozen=True)
class Scene:
    """A picture's ground truth."""

    id: str
    split: str
    size: int
    things: tuple[Thing, ...]
    glyph: Glyph | None = None


@dataclass(frozen=True)
class Clip:
    """A video's ground truth: ``mover`` goes from its position to ``to`` over the whole clip;
    ``blinker`` is shown on the beats listed (of ``BEATS``)."""

    id: str
    split: str
    size: int
    frames: int
    mover: Thing
    to: tuple[int, int]
    blinker: Thing
    beats: tuple[int, ...]

    @property
    def direction(self) -> str:
        dx, dy = self.to[0] - self.mover.x, self.to[1] - self.mover.y
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"

    @property
    def appearances(self) -> int:
        """How many separate runs of beats the blinker is shown on."""
        return sum(1 for i, beat in enumerate(self.beats) if i == 0 or beat != self.beats[i - 1] + 1)


@dataclass(frozen=True)
class WorldQuestion:
    """A question with its one answer, about a picture or a video."""

    id: str
    item: str
    question: str
    answer: str
    type: str
    category: str
    choices: tuple[str, ...] = ()


# --------------------------------------------------------------------------- scenes


def _rng(seed: int, split: str, kind: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{split}/{kind}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _extent(size: int, kind: str) -> int:
    unit = size / GRID
    return max(2, round(unit * (0.6 if kind == "small" else 2.4)))


def _place(rng: random.Random, size: int, extent: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """A centre whose box (with a margin) misses every box taken; the picture's edge kept clear."""
    margin = max(2, size // (2 * GRID))
    for _ in range(500):
        x = rng.randint(extent + margin, size - 1 - extent - margin)
        y = rng.randint(extent + margin, size - 1 - extent - margin)
        box = (x - extent - margin, y - extent - margin, x + extent + margin, y + extent + margin)
        if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
            taken.append(box)
            return x, y
    raise RuntimeError("no free place left in the picture; lower max_objects")


def make_scene(settings: WorldSettings, split: str, index: int) -> Scene:
    rng = _rng(settings.seed, split, "image", index)
    taken: list[tuple[int, int, int, int]] = []
    things = []
    for _ in range(rng.randint(settings.min_objects, settings.max_objects)):
        size_name = rng.choice(SIZES)
        extent = _extent(settings.size, size_name)
        x, y = _place(rng, settings.size, extent, taken)
        things.append(Thing(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size_name, x, y, extent))
    glyph = None
    if rng.random() < settings.glyph_share:
        extent = max(5, round(settings.size / GRID * 0.75))
        x, y = _place(rng, settings.size, extent, taken)
        glyph = Glyph(rng.choice(tuple(DIGITS)), x, y, extent)
    return Scene(f"{split}-{index:05d}", split, settings.size, tuple(things), glyph)


def make_clip(settings: WorldSettings, split: str, index: int) -> Clip:
    rng = _rng(settings.seed, split, "video", index)
    size = settings.size
    frames = BEATS * rng.choice((1, 2, 3, 4))
    colours = rng.sample(tuple(COLOURS), 3)
    extent = _extent(size, "large")
    # The mover crosses most of the picture along its axis, on a line of its own.
    direction = rng.choice(DIRECTIONS)
    low, high = extent + 2, size - 1 - extent - 2
    lane = rng.choice((size // 4, size // 2))
    start, end = (low, high) if direction in ("right", "down") else (high, low)
    if direction in ("left", "right"):
        mover_at, to = (start, lane), (end, lane)
        blinker_at = (rng.randint(low, high), size - lane if lane != size // 2 else size * 4 // 5)
    else:
        mover_at, to = (lane, start), (lane, end)
        blinker_at = (size - lane if lane != size // 2 else size * 4 // 5, rng.randint(low, high))
    mover = Thing(rng.choice(("circle", "triangle")), colours[0], "large", *mover_at, extent)
    blinker = Thing("square", colours[1], "large", *blinker_at, extent)
    # 1 to 3 appearances: runs of beats separated by at least one beat without the square.
    runs = rng.randint(1, 3)
    beats: list[int] = []
    while len({*beats}) == 0 or _runs(beats) != runs:
        beats = sorted(rng.sample(range(BEATS), rng.randint(runs, BEATS - runs + 1)))
    return Clip(f"{split}-v{index:04d}", split, size, frames, mover, to, blinker, tuple(beats))


def _runs(beats: list[int]) -> int:
    return sum(1 for i, beat in enumerate(beats) if i == 0 or beat != beats[i - 1] + 1)


# --------------------------------------------------------------------------- drawing


def _draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, fill: int | tuple[int, int, int] | None = None) -> None:
    """The thing in its colour, or in ``fill`` (a segment's index)."""
    colour = COLOURS[thing.colour] if fill is None else fill
    x0, y0, x1, y1 = thing.box()
    if thing.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif thing.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([(thing.x, y0), (x1, y1), (x0, y1)], fill=colour)


def _draw_glyph(draw: ImageDraw.ImageDraw, glyph: Glyph) -> None:
    draw.rectangle(
        (glyph.x - glyph.extent, glyph.y - glyph.extent, glyph.x + glyph.extent, glyph.y + glyph.extent),
        fill=(255, 255, 255),
    )
    scale = max(1, (2 * glyph.extent - 2) // 7)
    left, top = glyph.x - (5 * scale) // 2, glyph.y - (7 * scale) // 2
    for row, bits in enumerate(DIGITS[glyph.digit]):
        for col, bit in enumerate(bits):
            if bit == "1":
                x, y = left + col * scale, top + row * scale
                draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=(0, 0, 0))


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        _draw_thing(draw, thing)
    if scene.glyph is not None:
        _draw_glyph(draw, scene.glyph)
    return image


def segment_labels(scene: Scene) -> list[str]:
    """Each segment's words: "small red circle" per thing, then "box 7" for the glyph."""
    labels = [f"{t.size} {t.colour} {t.shape}" for t in scene.things]
    return labels + ([f"box {scene.glyph.digit}"] if scene.glyph is not None else [])


def draw_segments(scene: Scene) -> Image.Image:
    """The picture's segment map ("L"): pixel ``i`` is segment ``i`` of :func:`segment_labels`
    (counted from 1), 0 the ground; the same shapes :func:`draw_scene` paints."""
    image = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(image)
    for index, thing in enumerate(scene.things):
        _draw_thing(draw, thing, fill=index + 1)
    if scene.glyph is not None:
        g = scene.glyph
        draw.rectangle((g.x - g.extent, g.y - g.extent, g.x + g.extent, g.y + g.extent), fill=len(scene.things) + 1)
    return image


def clip_frames(clip: Clip) -> Iterator[Image.Image]:
    per_beat = clip.frames // BEATS
    for i in range(clip.frames):
        t = i / max(clip.frames - 1, 1)
        x = round(clip.mover.x + (clip.to[0] - clip.mover.x) * t)
        y = round(clip.mover.y + (clip.to[1] - clip.mover.y) * t)
        image = Image.new("RGB", (clip.size, clip.size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        if i // per_beat in clip.beats:
            _draw_thing(draw, clip.blinker)
        _draw_thing(draw, Thing(clip.mover.shape, clip.mover.colour, clip.mover.size, x, y, clip.mover.extent))
        yield image


def encode_video(frames: Iterator[Image.Image], size: int, fps: int = 8) -> bytes:
    """An MP4 (MPEG-4 part 2, one thread: the same frames give the same bytes)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        stream.thread_count = 1
        for i, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(picture), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


# --------------------------------------------------------------------------- words


def region(x: int, y: int, size: int) -> str:
    """Where a point lies on a 3 x 3 grid of the picture: "top left", "center", "bottom"..."""
    third = size / 3
    row = ("top", "", "bottom")[min(int(y // third), 2)]
    col = ("left", "", "right")[min(int(x // third), 2)]
    return " ".join(word for word in (row, col) if word) or "center"


def caption(scene: Scene) -> str:
    """The scene in words, left to right: what CLIP-style and LLaVA stage-1 training read."""
    parts = [(t.x, f"a {t.size} {t.colour} {t.shape} at the {region(t.x, t.y, scene.size)}") for t in scene.things]
    if scene.glyph is not None:
        g = scene.glyph
        parts.append((g.x, f"a box with the digit {g.digit} at the {region(g.x, g.y, scene.size)}"))
    words = [text for _, text in sorted(parts, key=lambda part: part[0])]
    body = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return body[0].upper() + body[1:] + "."


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _unique(scene: Scene, key: Callable[[Thing], object]) -> list[Thing]:
    keys = [key(t) for t in scene.things]
    return [t for t in scene.things if keys.count(key(t)) == 1]


def _attribute(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    by_size_shape = _unique(scene, lambda t: (t.size, t.shape))
    by_colour = _unique(scene, lambda t: t.colour)
    if by_size_shape and (not by_colour or rng.random() < 0.5):
        thing = rng.choice(by_size_shape)
        return f"What colour is the {thing.size} {thing.shape}?", thing.colour
    if by_colour:
        thing = rng.choice(by_colour)
        return f"What shape is the {thing.colour} object?", thing.shape
    return None


def _existence(scene: Scene, rng: random.Random, yes: bool) -> tuple[str, str]:
    present = sorted({(t.colour, t.shape) for t in scene.things})
    if yes:
        colour, shape = rng.choice(present)
    else:
        # Adversarial as in POPE: an absent pair that shares a colour or a shape with one present.
        near = sorted(
            {(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present}
            & ({(c, s) for c, _ in present for s in SHAPES} | {(c, s) for _, s in present for c in COLOURS})
        )
        colour, shape = rng.choice(near)
    return f"Is there a {colour} {shape} in the image?", "yes" if yes else "no"


def _count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        n = sum(1 for t in scene.things if t.shape == shape)
        return f"How many {_plural(shape)} are there?", str(n)
    colour = rng.choice(sorted({t.colour for t in scene.things}))
    n = sum(1 for t in scene.things if t.colour == colour)
    return f"How many {colour} objects are there?", str(n)


def spatial_relation(a: Thing, b: Thing) -> str | None:
    """Where ``a`` is relative to ``b`` when one axis clearly dominates (else None)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 2 * abs(dy) and abs(dx) > a.extent + b.extent:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) > a.extent + b.extent:
        return "above" if dy < 0 else "below"
    return None


def choice_question(text: str, options: tuple[str, ...]) -> str:
    lines = [text, *(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)), CHOICE_ANSWER]
    return "\n".join(lines)


def _spatial(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    named = _unique(scene, lambda t: (t.colour, t.shape))
    pairs = [(a, b, r) for a in named for b in named if a is not b and (r := spatial_relation(a, b))]
    if not pairs:
        return None
    a, b, relation = rng.choice(pairs)
    text = f"Where is the {a.name} relative to the {b.name}?"
    return choice_question(text, SPATIAL_OPTIONS), chr(ord("A") + SPATIAL_OPTIONS.index(relation))


def scene_questions(scene: Scene, index: int) -> list[WorldQuestion]:
    """One question per family the scene allows (existence alternates yes and no by index)."""
    rng = random.Random(f"{scene.id}/questions")
    asked: list[tuple[str, tuple[str, str] | None, str]] = [
        ("attribute", _attribute(scene, rng), EXACT),
        ("existence", _existence(scene, rng, yes=index % 2 == 0), YESNO),
        ("count", _count(scene, rng), NUMBER),
        ("spatial", _spatial(scene, rng), CHOICE),
    ]
    if scene.glyph is not None:
        asked.append(("detail", ("Which digit is in the box?", scene.glyph.digit), EXACT))
    questions = []
    for family, pair, kind in asked:
        if pair is None:
            continue
        text, answer = pair
        if kind != CHOICE:
            text = f"{text}\n{SHORT_ANSWER}"
        choices = SPATIAL_OPTIONS if kind == CHOICE else ()
        questions.append(WorldQuestion(f"{scene.id}-{family}", scene.id, text, answer, kind, family, choices))
    return questions


def training_questions(scene: Scene) -> list[WorldQuestion]:
    """Every question the scene supports, for training: each attribute of every object named
    uniquely, every pair present and as many adversarial absent ones, every count, up to six
    clear spatial relations, the digit, and the caption — in a seeded order."""
    rng = random.Random(f"{scene.id}/training")
    asked: list[tuple[str, str, str, str]] = []
    for thing in _unique(scene, lambda t: (t.size, t.shape)):
        asked.append(("attribute", f"What colour is the {thing.size} {thing.shape}?", thing.colour, EXACT))
    for thing in _unique(scene, lambda t: t.colour):
        asked.append(("attribute", f"What shape is the {thing.colour} object?", thing.shape, EXACT))
    present = sorted({(t.colour, t.shape) for t in scene.things})
    for _ in present:
        for yes in (True, False):
            text, answer = _existence(scene, rng, yes)
            asked.append(("existence", text, answer, YESNO))
    for shape in SHAPES:
        n = sum(1 for t in scene.things if t.shape == shape)
        asked.append(("count", f"How many {_plural(shape)} are there?", str(n), NUMBER))
    for colour in sorted({t.colour for t in scene.things}):
        n = sum(1 for t in scene.things if t.colour == colour)
        asked.append(("count", f"How many {colour} objects are there?", str(n), NUMBER))
    named = _unique(scene, lambda t: (t.colour, t.shape))
    pairs = [(a, b, r) for a in named for b in named if a is not b and (r := spatial_relation(a, b))]
    for a, b, relation in rng.sample(pairs, min(6, len(pairs))):
        text = choice_question(f"Where is the {a.name} relative to the {b.name}?", SPATIAL_OPTIONS)
        asked.append(("spatial", text, chr(ord("A") + SPATIAL_OPTIONS.index(relation)), CHOICE))
    if scene.glyph is not None:
        asked.append(("detail", "Which digit is in the box?", scene.glyph.digit, EXACT))
    questions = []
    for number, (family, text, answer, kind) in enumerate(asked):
        if kind != CHOICE:
            text = f"{text}\n{SHORT_ANSWER}"
        choices = SPATIAL_OPTIONS if kind == CHOICE else ()
        questions.append(WorldQuestion(f"{scene.id}-{family}-{number}", scene.id, text, answer, kind, family, choices))
    questions.append(WorldQuestion(f"{scene.id}-caption", scene.id, CAPTION_PROMPT, caption(scene), EXACT, "caption"))
    rng.shuffle(questions)
    return questions


def clip_questions(clip: Clip) -> list[WorldQuestion]:
    mover, blinker = clip.mover, clip.blinker
    return [
        WorldQuestion(
            f"{clip.id}-motion", clip.id, f"Which way does the {mover.name} move?\n{SHORT_ANSWER}",
            clip.direction, EXACT, "motion",
        ),
        WorldQuestion(
            f"{clip.id}-blinks", clip.id, f"How many times does the {blinker.name} appear?\n{SHORT_ANSWER}",
            str(clip.appearances), NUMBER, "blinks",
        ),
    ]  # fmt: skip


def balance(questions: list[WorldQuestion], families: tuple[str, ...]) -> list[WorldQuestion]:
    """As many questions of each family as the rarest has, in their original order."""
    present = [f for f in families if any(q.category == f for q in questions)]
    if not present:
        return []
    least = min(sum(1 for q in questions if q.category == f) for f in present)
    kept: dict[str, int] = dict.fromkeys(present, 0)
    out = []
    for q in questions:
        if q.category in kept and kept[q.category] < least:
            kept[q.category] += 1
            out.append(q)
    return out


def mix(questions: list[WorldQuestion], turns: int, rng: random.Random) -> list[WorldQuestion]:
    """``turns`` of the questions (captions left out), the families taking turns so each is drawn
    as often as the others (a family's questions repeat when it has fewer), in a shuffled order:
    a family as rare as the digit question is never learned beside the others otherwise
    (docs/training.md)."""
    by_family: dict[str, list[WorldQuestion]] = {}
    for q in questions:
        if q.category != "caption":
            by_family.setdefault(q.category, []).append(q)
    if not by_family:
        return []
    families = sorted(by_family)
    rng.shuffle(families)
    for pool in by_family.values():
        rng.shuffle(pool)
    picked = []
    for k in range(turns):
        pool = by_family[families[k % len(families)]]
        picked.append(pool[(k // len(families)) % len(pool)])
    rng.shuffle(picked)
    return picked


# --------------------------------------------------------------------------- files


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _turns(questions: list[WorldQuestion], lead: str) -> list[dict]:
    """The questions as LLaVA turns, ``lead`` (a media tag, the scene in words) before the first."""
    turns = []
    for number, q in enumerate(questions):
        turns += [
            {"from": "human", "value": f"{lead if number == 0 else ''}{q.question}"},
            {"from": "gpt", "value": q.answer},
        ]
    return turns


def _conversation(item: str, questions: list[WorldQuestion], media_key: str, path: str) -> dict:
    """One LLaVA conversation about a picture or a video: its questions as turns, the media tag
    on the first (as LLaVA's instruction data has it: one forward reads the picture once for
    every answer)."""
    tag = f"<{'video' if media_key == 'video' else 'image'}>\n"
    return {"id": item, media_key: path, "conversations": _turns(questions, tag)}


def _words_conversation(scene: Scene, questions: list[WorldQuestion]) -> dict:
    """A picture's conversation with the scene told in words where the picture would be: the
    caption first, then the questions as turns (the caption question itself left out)."""
    asked = [q for q in questions if q.category != "caption"]
    return {"id": f"{scene.id}-words", "conversations": _turns(asked, f"{caption(scene)}\n")}


def _write_instruct_words(path: Path, settings: WorldSettings) -> None:
    """The training mix in words: a conversation per train scene, pictured or not (a scene the
    generator cannot place is skipped). One line per conversation: this file is the big one."""
    with path.open("w") as f:
        f.write("[")
        written = 0
        for index in range(settings.word_scenes):
            try:
                scene = make_scene(settings, "train", index)
            except RuntimeError:
                continue
            asked = mix(training_questions(scene), settings.turns, random.Random(f"{scene.id}/words"))
            entry = {"id": f"{scene.id}-words", "conversations": _turns(asked, f"{caption(scene)}\n")}
            f.write((",\n" if written else "\n") + json.dumps(entry))
            written += 1
        f.write("\n]\n")


def _write_dense_pictures(out_dir: Path, settings: WorldSettings) -> list[dict]:
    """Pictures (and their segment maps) drawn for the ``dense`` stage alone, from a seed of
    their own (split ``dense``): no train picture, and none of the test split, is among them."""
    entries = []
    for folder in ("images", "segments"):
        (out_dir / folder / "dense").mkdir(parents=True, exist_ok=True)
    for index in range(settings.dense_pictures):
        try:
            scene = make_scene(settings, "dense", index)
        except RuntimeError:
            continue
        path = f"images/dense/{scene.id}.png"
        (out_dir / path).write_bytes(_png(draw_scene(scene)))
        entries.append(_write_segments(out_dir, scene, path))
    return entries


def _write_segments(out_dir: Path, scene: Scene, path: str) -> dict:
    """Write the scene's segment map beside its picture's split; its segments.json entry."""
    mask = f"segments/{scene.split}/{scene.id}.png"
    (out_dir / mask).write_bytes(_png(draw_segments(scene)))
    return {"id": scene.id, "image": path, "segments": mask, "labels": segment_labels(scene)}


def _eval_line(q: WorldQuestion, media_key: str, path: str) -> dict:
    line = {"id": q.id, media_key: path, "question": q.question, "answer": q.answer, "type": q.type}
    if q.choices:
        line["choices"] = list(q.choices)
    line["category"] = q.category
    return line


def write_world(out_dir: Path, settings: WorldSettings = WorldSettings(), progress=None) -> dict:
    """Write the world into ``out_dir``; returns what ``world.json`` says (counts included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    families = ("attribute", "existence", "count", "spatial", "detail")
    with (out_dir / "scenes.jsonl").open("w") as scenes_file:
        for split in SPLITS:
            (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
            questions: list[tuple[WorldQuestion, str, str]] = []
            conversations: list[dict] = []
            words: list[dict] = []
            captions = []
            instruct: list[dict] = []
            segments: list[dict] = []
            if split == "train":
                (out_dir / "segments" / split).mkdir(parents=True, exist_ok=True)
            for index in range(settings.pictures(split)):
                scene = make_scene(settings, split, index)
                path = f"images/{split}/{scene.id}.png"
                (out_dir / path).write_bytes(_png(draw_scene(scene)))
                scenes_file.write(json.dumps({"kind": "image", "image": path, **asdict(scene)}) + "\n")
                captions.append(
                    {
                        "id": scene.id,
                        "image": path,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                            {"from": "gpt", "value": caption(scene)},
                        ],
                    }
                )
                if split == "train":
                    asked = training_questions(scene)
                    conversations.append(_conversation(scene.id, asked, "image", path))
                    words.append(_words_conversation(scene, asked))
                    rng = random.Random(f"{scene.id}/mix")
                    for k in range(settings.mixes):
                        instruct.append(
                            _conversation(f"{scene.id}-mix{k}", mix(asked, settings.turns, rng), "image", path)
                        )
                    segments.append(_write_segments(out_dir, scene, path))
                else:
                    questions += [(q, "image", path) for q in scene_questions(scene, index)]
                if progress is not None:
                    progress.step(f"{split} picture {index + 1}")
            if settings.videos(split):
                (out_dir / "videos" / split).mkdir(parents=True, exist_ok=True)
            video_questions: list[tuple[WorldQuestion, str, str]] = []
            for index in range(settings.videos(split)):
                clip = make_clip(settings, split, index)
                path = f"videos/{split}/{clip.id}.mp4"
                (out_dir / path).write_bytes(encode_video(clip_frames(clip), clip.size))
                record = {"kind": "video", "video": path, **asdict(clip), "direction": clip.direction}
                scenes_file.write(json.dumps({**record, "appearances": clip.appearances}) + "\n")
                if split == "train":
                    # In a shuffled order: asked always in one order, a model learns each answer's
                    # turn, not its question (it answered the blinks question, asked alone, with a
                    # direction; docs/training.md).
                    asked = clip_questions(clip)
                    random.Random(f"{clip.id}/order").shuffle(asked)
                    conversations.append(_conversation(clip.id, asked, "video", path))
                else:
                    video_questions += [(q, "video", path) for q in clip_questions(clip)]
                if progress is not None:
                    progress.step(f"{split} video {index + 1}")
            if split == "test":
                by_id = {q.id: (q, key, path) for q, key, path in questions}
                questions = [by_id[q.id] for q in balance([q for q, _, _ in questions], families)]
            questions += video_questions
            if split == "train":
                with (out_dir / "captions.json").open("w") as f:
                    json.dump(captions, f, indent=1)
                with (out_dir / "train.json").open("w") as f:
                    json.dump(conversations, f, indent=1)
                with (out_dir / "words.json").open("w") as f:
                    json.dump(words, f, indent=1)
                with (out_dir / "instruct.json").open("w") as f:
                    json.dump(instruct, f, indent=1)
                segments += _write_dense_pictures(out_dir, settings)
                with (out_dir / "segments.json").open("w") as f:
                    json.dump(segments, f, indent=1)
                _write_instruct_words(out_dir / "instruct_words.json", settings)
            else:
                with (out_dir / f"{split}.jsonl").open("w") as f:
                    for q, key, path in questions:
                        f.write(json.dumps(_eval_line(q, key, path)) + "\n")
            asked = sum(len(c["conversations"]) // 2 for c in conversations) if split == "train" else len(questions)
            counts[split] = {"pictures": settings.pictures(split), "videos": settings.videos(split), "questions": asked}
    description = {
        "format": FORMAT,
        "settings": asdict(settings),
        "counts": counts,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "families": [*families, "motion", "blinks"],
    }
    (out_dir / "world.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def total_items(settings: WorldSettings) -> int:
    """Pictures and videos written: the progress bar's steps."""
    return sum(settings.pictures(s) + settings.videos(s) for s in SPLITS)
