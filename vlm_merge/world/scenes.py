"""Scenes of the miniature world: coloured shapes on a 3x3 grid, drawn with PIL, and questions about them.

A scene is up to `MAX_OBJECTS` objects, each a (colour, shape) in its own cell of a 3x3 grid. The image is
`IMAGE_SIZE` pixels square, one grid cell per vision patch (so a patch token sees one object). Questions
come in English and Japanese, several phrasings per type, and most need more than one attribute read off
one object (counting a colour, counting a colour+shape, comparing two counts, finding a unique object):

| type | asks | attribute |
|---|---|---|
| count_color / count_shape / count_both | how many red things / circles / red circles | count |
| color_of | the colour of the only circle | color |
| shape_of | the shape of the only red thing | shape |
| what_at | the object at a position (or nothing) | object |
| where | the position of the only red circle | position |
| more | which of two shapes / colours is more numerous | shape / color |

How a world words its scenes, questions and answers is a `Phrasebook`: which question types it asks,
sentence answers ("there are two red things.") or short ones ("two", as VQAv2 and JA-VG-VQA answer), counts as
number words or digits ("2" / "2個"), and the Japanese word order (natural, or the content words in the English
order). Every question records its `attribute` and language-independent `value`; `content_correct` checks that
a prediction names exactly that value (and no other value of that attribute) in the question's language, in
any of the phrasebooks' forms.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
MAX_OBJECTS = 5
BACKGROUND = (236, 232, 222)  # washi paper

COLORS = {  # name -> (RGB, EN, JA adjective, JA noun)
    "red": ((214, 40, 40), "red", "赤い", "赤"),
    "blue": ((40, 80, 210), "blue", "青い", "青"),
    "green": ((40, 160, 70), "green", "緑の", "緑"),
    "yellow": ((235, 190, 20), "yellow", "黄色い", "黄色"),
}
SHAPES = {  # name -> (EN singular, EN plural, JA)
    "circle": ("circle", "circles", "丸"),
    "square": ("square", "squares", "四角"),
    "triangle": ("triangle", "triangles", "三角"),
    "star": ("star", "stars", "星"),
}
POSITIONS = {  # cell index (row * 3 + col) -> (EN, JA)
    0: ("top left", "左上"), 1: ("top", "上"), 2: ("top right", "右上"),
    3: ("left", "左"), 4: ("center", "真ん中"), 5: ("right", "右"),
    6: ("bottom left", "左下"), 7: ("bottom", "下"), 8: ("bottom right", "右下"),
}  # fmt: skip
EN_POS_PREP = {4: "in the center"}  # otherwise "at the <pos>"
EN_NUMBERS = ["no", "one", "two", "three", "four", "five"]
JA_NUMBERS = ["ゼロ", "一つ", "二つ", "三つ", "四つ", "五つ"]
LANGS = ("en", "ja")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: int


@dataclass
class Scene:
    objects: list[Obj]
    jitter: list[tuple[int, int, int]] = field(default_factory=list)  # per object: dx, dy, size

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in self.objects)

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)


def sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    objs = [Obj(rng.choice(list(COLORS)), rng.choice(list(SHAPES)), c) for c in sorted(cells)]
    jitter = [(rng.randint(-1, 1), rng.randint(-1, 1), rng.randint(10, 13)) for _ in objs]
    return Scene(objs, jitter)


def draw_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image (deterministic given the scene)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(image)
    for obj, (dx, dy, size) in zip(scene.objects, scene.jitter or [(0, 0, 12)] * len(scene.objects)):
        row, col = divmod(obj.cell, GRID)
        cx, cy = col * CELL + CELL / 2 + dx, row * CELL + CELL / 2 + dy
        r = size / 2
        fill = COLORS[obj.color][0]
        if obj.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            d.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=fill)
        elif obj.shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r - 1), (cx - r, cy + r - 1)], fill=fill)
        else:  # five-pointed star
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            d.polygon(pts, fill=fill)
    return image


# ---------------------------------------------------------------- words
def en_obj(color: str | None, shape: str | None, n: int = 1) -> str:
    """'red circle(s)' / 'red thing(s)' / 'circle(s)'."""
    noun = (SHAPES[shape][1] if n != 1 else SHAPES[shape][0]) if shape else ("things" if n != 1 else "thing")
    return f"{COLORS[color][1]} {noun}" if color else noun


def ja_obj(color: str | None, shape: str | None) -> str:
    noun = SHAPES[shape][2] if shape else "もの"
    return f"{COLORS[color][2]}{noun}" if color else noun


def en_pos(cell: int) -> str:
    return EN_POS_PREP.get(cell, f"at the {POSITIONS[cell][0]}")


def count_word(n: int, lang: str, digits: bool = False) -> str:
    """'two' / '二つ', or with `digits` '2' / '2個'."""
    if digits:
        return f"{n}個" if lang == "ja" else str(n)
    return JA_NUMBERS[n] if lang == "ja" else EN_NUMBERS[n]


def en_count_sentence(n: int, color: str | None, shape: str | None, digits: bool = False) -> str:
    things = en_obj(color, shape, n)
    if n == 0:
        return f"there are no {things}."
    return f"there {'is' if n == 1 else 'are'} {count_word(n, 'en', digits)} {things}."


def ja_count_sentence(n: int, color: str | None, shape: str | None, digits: bool = False) -> str:
    things = ja_obj(color, shape)
    return f"{things}はありません。" if n == 0 else f"{things}は{count_word(n, 'ja', digits)}あります。"


def describe(scene: Scene, lang: str, ja_order: str = "natural") -> str:
    """A text description of the scene listing every object with its position (the text world's scenes).
    Japanese puts each place first (左上に赤い丸、…があります。), or with `ja_order="aligned"` each object first,
    in the English order (赤い丸が左上に、…あります。)."""
    if lang == "en":
        parts = [f"a {en_obj(o.color, o.shape)} {en_pos(o.cell)}" for o in scene.objects]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"there is {body}."
    if ja_order == "aligned":
        return "、".join(f"{ja_obj(o.color, o.shape)}が{POSITIONS[o.cell][1]}に" for o in scene.objects) + "あります。"
    parts = [f"{POSITIONS[o.cell][1]}に{ja_obj(o.color, o.shape)}" for o in scene.objects]
    return "、".join(parts) + "があります。"


# ---------------------------------------------------------------- questions
QTYPES = ("count_color", "count_shape", "count_both", "color_of", "shape_of", "what_at", "where", "more")

PHRASINGS: dict[str, dict[str, list[str]]] = {
    "count_color": {
        "en": ["how many {c} things are there?", "how many {c} things do you see?", "count the {c} things.",
               "what is the number of {c} things?"],
        "ja": ["{cj}ものはいくつありますか？", "{cj}ものは何個ありますか？", "{cj}ものを数えてください。",
               "{cj}ものの数はいくつですか？"],
    },
    "count_shape": {
        "en": ["how many {ss} are there?", "how many {ss} do you see?", "count the {ss}.", "what is the number of {ss}?"],
        "ja": ["{sj}はいくつありますか？", "{sj}は何個ありますか？", "{sj}を数えてください。", "{sj}の数はいくつですか？"],
    },
    "count_both": {
        "en": ["how many {c} {ss} are there?", "how many {c} {ss} do you see?", "count the {c} {ss}."],
        "ja": ["{cj}{sj}はいくつありますか？", "{cj}{sj}は何個ありますか？", "{cj}{sj}を数えてください。"],
    },
    "color_of": {
        "en": ["what color is the {s}?", "which color does the {s} have?", "tell me the color of the {s}."],
        "ja": ["{sj}は何色ですか？", "{sj}の色は何ですか？", "{sj}の色を教えてください。"],
    },
    "shape_of": {
        "en": ["what shape is the {c} thing?", "which shape does the {c} thing have?", "what is the {c} thing?"],
        "ja": ["{cj}ものはどんな形ですか？", "{cj}ものの形は何ですか？", "{cj}ものは何ですか？"],
    },
    "what_at": {
        "en": ["what is {p}?", "what do you see {p}?", "tell me what is {p}."],
        "ja": ["{pj}には何がありますか？", "{pj}に何が見えますか？", "{pj}にあるものは何ですか？"],
    },
    "where": {
        "en": ["where is the {c} {s}?", "where can you see the {c} {s}?", "in which place is the {c} {s}?"],
        "ja": ["{cj}{sj}はどこにありますか？", "{cj}{sj}はどこに見えますか？", "{cj}{sj}の場所はどこですか？"],
    },
    "more": {
        "en": ["are there more {a} or more {b}?", "which are more numerous, {a} or {b}?", "do you see more {a} or {b}?"],
        "ja": ["{aj}と{bj}はどちらが多いですか？", "{aj}と{bj}のどちらが多いですか？", "{aj}と{bj}、多いのはどちらですか？"],
    },
}

# The Japanese phrasings with the content words in the English order, in forms a Japanese speaker uses (a
# postposed topic: 何色ですか、丸は？); phrasing i translates the English phrasing i.
PHRASINGS_JA_ALIGNED: dict[str, list[str]] = {
    "count_color": ["いくつの{cj}ものがありますか？", "いくつの{cj}ものが見えますか？", "数えてください、{cj}ものを。",
                    "何個の{cj}ものがありますか？"],
    "count_shape": ["いくつの{sj}がありますか？", "いくつの{sj}が見えますか？", "数えてください、{sj}を。", "何個の{sj}がありますか？"],
    "count_both": ["いくつの{cj}{sj}がありますか？", "いくつの{cj}{sj}が見えますか？", "数えてください、{cj}{sj}を。"],
    "color_of": ["何色ですか、{sj}は？", "どんな色ですか、{sj}は？", "教えてください、{sj}の色を。"],
    "shape_of": ["どんな形ですか、{cj}ものは？", "何の形ですか、{cj}ものは？", "何ですか、{cj}ものは？"],
    "what_at": ["何がありますか、{pj}には？", "何が見えますか、{pj}に？", "教えてください、何があるか、{pj}に。"],
    "where": ["どこにありますか、{cj}{sj}は？", "どこに見えますか、{cj}{sj}は？", "どこですか、{cj}{sj}の場所は？"],
    "more": ["多いのはどちらですか、{aj}と{bj}？", "どちらが多いですか、{aj}と{bj}？", "多く見えるのはどちらですか、{aj}と{bj}？"],
}
ANSWER_FORMS = ("sentence", "short")
JA_ORDERS = ("natural", "aligned")


@dataclass(frozen=True)
class QA:
    qtype: str
    lang: str
    question: str
    answer: str
    attribute: str  # count | color | shape | object | position
    value: str  # language independent: "2", "red", "circle", "red circle" / "nothing", "4"


def _question_candidates(scene: Scene, qtype: str) -> list[dict]:
    colors, shapes = list(COLORS), list(SHAPES)
    out: list[dict] = []
    if qtype == "count_color":
        out = [{"color": c} for c in colors]
    elif qtype == "count_shape":
        out = [{"shape": s} for s in shapes]
    elif qtype == "count_both":
        out = [{"color": c, "shape": s} for c in colors for s in shapes if scene.count(c) or scene.count(shape=s)]
    elif qtype == "color_of":
        out = [{"shape": s} for s in shapes if scene.count(shape=s) == 1]
    elif qtype == "shape_of":
        out = [{"color": c} for c in colors if scene.count(c) == 1]
    elif qtype == "what_at":
        out = [{"cell": k} for k in range(GRID * GRID)]
    elif qtype == "where":
        out = [{"color": o.color, "shape": o.shape} for o in scene.objects if scene.count(o.color, o.shape) == 1]
    elif qtype == "more":
        for kind, names in (("shape", shapes), ("color", colors)):
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    na = scene.count(**{kind: a})
                    nb = scene.count(**{kind: b})
                    if na != nb:
                        out.append({"kind": kind, "a": a, "b": b})
    return out


def _sentence_qa(scene: Scene, qtype: str, lang: str, args: dict, t: str, digits: bool) -> QA:
    """The question from template `t` and its full-sentence answer."""
    ja = lang == "ja"
    c, s = args.get("color"), args.get("shape")
    fill = {
        "c": COLORS[c][1] if c else "", "cj": COLORS[c][2] if c else "",
        "s": SHAPES[s][0] if s else "", "ss": SHAPES[s][1] if s else "", "sj": SHAPES[s][2] if s else "",
    }
    if qtype.startswith("count_"):
        n = scene.count(c, s)
        answer = ja_count_sentence(n, c, s, digits) if ja else en_count_sentence(n, c, s, digits)
        return QA(qtype, lang, t.format(**fill), answer, "count", str(n))
    if qtype == "color_of":
        obj = next(o for o in scene.objects if o.shape == s)
        answer = f"{SHAPES[s][2]}は{COLORS[obj.color][3]}です。" if ja else f"the {s} is {COLORS[obj.color][1]}."
        return QA(qtype, lang, t.format(**fill), answer, "color", obj.color)
    if qtype == "shape_of":
        obj = next(o for o in scene.objects if o.color == c)
        answer = f"{COLORS[c][2]}ものは{SHAPES[obj.shape][2]}です。" if ja else f"the {c} thing is a {obj.shape}."
        return QA(qtype, lang, t.format(**fill), answer, "shape", obj.shape)
    if qtype == "what_at":
        k = args["cell"]
        obj = scene.at(k)
        p, pj = en_pos(k), POSITIONS[k][1]
        q = t.format(p=p, pj=pj)
        if obj is None:
            answer = f"{pj}には何もありません。" if ja else f"there is nothing {p}."
            return QA(qtype, lang, q, answer, "object", "nothing")
        answer = f"{pj}には{ja_obj(obj.color, obj.shape)}があります。" if ja else f"there is a {en_obj(obj.color, obj.shape)} {p}."
        return QA(qtype, lang, q, answer, "object", f"{obj.color} {obj.shape}")
    if qtype == "where":
        obj = next(o for o in scene.objects if o.color == c and o.shape == s)
        answer = (f"{ja_obj(c, s)}は{POSITIONS[obj.cell][1]}にあります。" if ja
                  else f"the {en_obj(c, s)} is {en_pos(obj.cell)}.")
        return QA(qtype, lang, t.format(**fill), answer, "position", str(obj.cell))
    if qtype == "more":
        kind, a, b = args["kind"], args["a"], args["b"]
        na, nb = scene.count(**{kind: a}), scene.count(**{kind: b})
        win = a if na > nb else b
        if kind == "shape":
            words = {x: (SHAPES[x][1], SHAPES[x][2]) for x in (a, b)}
        else:
            words = {x: (en_obj(x, None, 2), ja_obj(x, None)) for x in (a, b)}
        q = t.format(a=words[a][0], b=words[b][0], aj=words[a][1], bj=words[b][1])
        answer = f"{words[win][1]}のほうが多いです。" if ja else f"there are more {words[win][0]}."
        return QA(qtype, lang, q, answer, kind, win)
    raise ValueError(qtype)


def short_answer(qa: QA, digits: bool = False) -> str:
    """The asked value's word(s), as VQAv2 / JA-VG-VQA answer: "two" / "二つ" ("2" / "2個" with `digits`), "red" /
    "赤", "top left" / "左上", "a red circle" / "赤い丸", "nothing" / "何もありません", zero "none" / "ありません"."""
    ja, v, attribute = qa.lang == "ja", qa.value, qa.attribute
    if attribute == "count":
        n = int(v)
        if digits:
            return count_word(n, qa.lang, digits=True)
        return ("ありません" if ja else "none") if n == 0 else count_word(n, qa.lang)
    if attribute == "color" and qa.qtype == "more":
        return ja_obj(v, None) if ja else en_obj(v, None, 2)
    if attribute == "color":
        return COLORS[v][3] if ja else COLORS[v][1]
    if attribute == "shape":
        return SHAPES[v][2] if ja else SHAPES[v][1 if qa.qtype == "more" else 0]
    if attribute == "object" and v == "nothing":
        return "何もありません" if ja else "nothing"
    if attribute == "object":
        color, shape = v.split()
        return ja_obj(color, shape) if ja else f"a {en_obj(color, shape)}"
    return POSITIONS[int(v)][1 if ja else 0]  # position


@dataclass(frozen=True)
class Phrasebook:
    """How a world words its scenes, questions and answers. The defaults are the world's first wording (every
    type, sentence answers, number words, the natural Japanese order); a zoo's is `WorldSettings.phrasebook()`.

    qtypes: the question types asked, in every stream (text corpora, VLM stage, dev/test splits), kept in
      `QTYPES` order; the scenes and descriptions are the same whichever types are asked.
    answers: "sentence" ("there are two red things." / "赤いものは二つあります。") or "short" (`short_answer`).
    count_digits: counts as digits ("2" / "2個"), so a count's first answer token is the same in both languages.
    ja_order: "natural" (赤いものはいくつありますか？) or "aligned": the Japanese phrasings and descriptions put
      their content words in the English order (`PHRASINGS_JA_ALIGNED`, `describe`).
    """

    qtypes: tuple[str, ...] = QTYPES
    answers: str = "sentence"
    count_digits: bool = False
    ja_order: str = "natural"

    def __post_init__(self) -> None:
        from vlm_merge.errors import VlmMergeError

        unknown = [q for q in self.qtypes if q not in QTYPES]
        if unknown or not self.qtypes:
            raise VlmMergeError(f"qtypes={list(self.qtypes)}: expected a non-empty list of {', '.join(QTYPES)}")
        object.__setattr__(self, "qtypes", tuple(q for q in QTYPES if q in self.qtypes))
        for name, allowed in (("answers", ANSWER_FORMS), ("ja_order", JA_ORDERS)):
            if getattr(self, name) not in allowed:
                raise VlmMergeError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    def phrasings(self, qtype: str, lang: str) -> list[str]:
        if lang == "ja" and self.ja_order == "aligned":
            return PHRASINGS_JA_ALIGNED[qtype]
        return PHRASINGS[qtype][lang]

    def describe(self, scene: Scene, lang: str) -> str:
        return describe(scene, lang, self.ja_order)

    def make_qa(self, scene: Scene, qtype: str, lang: str, args: dict, phrasing: int) -> QA:
        """The question about `args` in phrasing number `phrasing` (modulo the type's phrasings) and its answer."""
        templates = self.phrasings(qtype, lang)
        qa = _sentence_qa(scene, qtype, lang, args, templates[phrasing % len(templates)], self.count_digits)
        if self.answers == "short":
            return replace(qa, answer=short_answer(qa, self.count_digits))
        return qa

    def sample_qa(self, scene: Scene, rng: random.Random, lang: str) -> QA:
        """One random question about `scene` (a type with candidates, then a candidate and a phrasing)."""
        while True:
            qtype = rng.choice(self.qtypes)
            cands = _question_candidates(scene, qtype)
            if cands:
                args = choose_args(scene, qtype, cands, rng)
                return self.make_qa(scene, qtype, lang, args, rng.randrange(len(self.phrasings(qtype, lang))))

    def japanese_words(self) -> set[str]:
        """Japanese words this phrasebook writes beyond the shared lexicon (the counter 個 of digit counts)."""
        return {"個"} if self.count_digits else set()


def _is_empty_answer(scene: Scene, qtype: str, args: dict) -> bool:
    if qtype.startswith("count_"):
        return scene.count(args.get("color"), args.get("shape")) == 0
    if qtype == "what_at":
        return scene.at(args["cell"]) is None
    return False


def choose_args(scene: Scene, qtype: str, cands: list[dict], rng: random.Random) -> dict:
    """A candidate, asking about something present 80% of the time (so "none" / "nothing" is no free guess)."""
    full = [a for a in cands if not _is_empty_answer(scene, qtype, a)]
    empty = [a for a in cands if _is_empty_answer(scene, qtype, a)]
    if full and (not empty or rng.random() < 0.8):
        return rng.choice(full)
    return rng.choice(empty or cands)


# ---------------------------------------------------------------- content scoring
def _lexicon(attribute: str, lang: str) -> dict[str, list[str]]:
    """value -> surface forms naming it in `lang`."""
    ja = lang == "ja"
    if attribute == "count":  # number words and digits (every phrasebook's forms)
        forms = {str(n): [count_word(n, lang), count_word(n, lang, digits=True)] for n in range(MAX_OBJECTS + 1)}
        forms["0"] += ["ありません"] if ja else ["none"]
        return forms
    if attribute == "color":
        return {k: [v[3]] if ja else [v[1]] for k, v in COLORS.items()}
    if attribute == "shape":
        return {k: [v[2]] if ja else [v[0], v[1]] for k, v in SHAPES.items()}
    if attribute == "position":
        return {str(k): [v[1]] if ja else [v[0]] for k, v in POSITIONS.items()}
    raise ValueError(attribute)


def mentions(text: str, attribute: str, lang: str) -> set[str]:
    """Values of `attribute` named in `text` (longest surface forms first; EN matched on word boundaries)."""
    if attribute == "object":
        colors, shapes = mentions(text, "color", lang), mentions(text, "shape", lang)
        nothing = ("何もありません" in text) if lang == "ja" else bool(re.search(r"\bnothing\b", text.lower()))
        found = {f"{c} {s}" for c in colors for s in shapes}
        return found | ({"nothing"} if nothing else set()) | ({"?"} if len(colors) + len(shapes) > 0 and not found else set())
    forms = sorted(((f, v) for v, fs in _lexicon(attribute, lang).items() for f in fs), key=lambda x: -len(x[0]))
    s = text.lower() if lang == "en" else text
    found: set[str] = set()
    for form, value in forms:
        pattern = rf"\b{re.escape(form)}\b" if lang == "en" else re.escape(form)
        if re.search(pattern, s):
            found.add(value)
            s = re.sub(pattern, " ", s)
    return found


def content_correct(prediction: str, attribute: str, value: str, lang: str) -> bool:
    """True when the prediction names the asked value, and no other value of that attribute, in `lang`."""
    return mentions(prediction, attribute, lang) == {value}
