"""
The shapes world: a synthetic stand-in for LLaVA's data and benchmarks, made offline from a seed.

`python shapes.py` (or the first `python train.py config/shapes.py`) writes data/shapes/: images of
1-4 coloured shapes on a 3x3 grid, LLaVA-format pretrain.json / instruct.json, text.json (the tiny LM's
pretraining: such conversations about scenes written as words), a word-level tokenizer,
and held-out POPE, GQA and MME files in the real benchmarks' formats; also the lab (the end of this file):
crowded, textured scenes in instruct.json and in harder POPE and GQA files (eval/lab). This is nanoGPT's
data/<name>/prepare.py role; data.py holds the real LLaVA pipeline that reads what this writes.
"""
import functools
import json
import math
import os
import random
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from data import IMAGE_TEXT, SYSTEM

# the shapes world: scenes of 1-4 coloured shapes in a 3x3 grid

SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLORS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 100, 235),
          'yellow': (235, 215, 40), 'purple': (150, 60, 200), 'orange': (245, 140, 30)}
SIZES = ('small', 'large')
POSITIONS = (('top left', 'top', 'top right'),  # POSITIONS[row][col]
             ('left', 'center', 'right'),
             ('bottom left', 'bottom', 'bottom right'))
PLACES = {'left': 'on the left', 'right': 'on the right', 'center': 'in the center'}  # else "at the <position>"
SIDES = {'left': 'on the left side of the image', 'right': 'on the right side of the image',
         'top': 'at the top of the image', 'bottom': 'at the bottom of the image'}
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four')
LAB_NUMBER_WORDS = NUMBER_WORDS + ('five', 'six', 'seven', 'eight')  # the lab counts to 8; NUMBER_WORDS stays the
# grid world's, which its tokenizer is built from
GRID_MAX_OBJECTS = 4
CATEGORIES = [(color, shape) for color in COLORS for shape in SHAPES]  # POPE's "objects": 'red circle', ...
# Uneven category frequencies and a bias to co-occur with a category sharing a colour or shape give POPE's
# popular and adversarial negatives something to find, as COCO's do.
POPULARITY = {category: 1 / (1 + 0.25 * ((7 * i) % len(CATEGORIES))) for i, category in enumerate(CATEGORIES)}
SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'  # LLaVA-1.5's VQA / POPE / GQA prompt
YES_NO = ' Please answer yes or no.'  # MME's question ending
DESCRIBE = ('Describe the image briefly.', 'Give a short caption for the image.', 'What is in this picture?',
            'Summarize the visual content of the image.')
TEXT_ONLY = (('How many sides does a triangle have?', '3'), ('How many sides does a square have?', '4'),
             ('What color do you get when you mix red and yellow?', 'orange'),
             ('What color do you get when you mix blue and yellow?', 'green'),
             ('What color do you get when you mix red and blue?', 'purple'),
             ('Does a circle have corners?', 'no'), ('Does a diamond have corners?', 'yes'))


def sample_categories(rng, n):
    """n distinct (color, shape) pairs, popular ones more often, later ones often related to earlier ones."""
    chosen = []
    while len(chosen) < n:
        pool = [c for c in CATEGORIES if c not in chosen]
        if chosen and rng.random() < 0.5:
            pool = [c for c in pool if any(c[0] == o[0] or c[1] == o[1] for o in chosen)] or pool
        chosen.append(rng.choices(pool, weights=[POPULARITY[c] for c in pool])[0])
    return chosen


def sample_scene(rng, image_px):
    """1-4 objects, each centred in its own cell of a 3x3 grid (so they never overlap), in reading order.
    Centred, because the tiny encoders are random: an object shifted inside its cell lands on different
    pixels of a 16-px patch, and a random patch embedding then hardly tells its shape (single-object shape
    naming: 63 % with shifts of up to the cell's slack, 99 % centred, same training)."""
    n = rng.randint(1, GRID_MAX_OBJECTS)
    cells = sorted(rng.sample(range(9), n))
    cell_px = image_px / 3
    scene = []
    for cell, (color, shape) in zip(cells, sample_categories(rng, n)):
        row, col = divmod(cell, 3)
        size = rng.choice(SIZES)
        radius = cell_px * (0.28 if size == 'small' else 0.38) * rng.uniform(0.9, 1.1)
        scene.append(dict(color=color, shape=shape, size=size, row=row, col=col, radius=radius,
                          x=(col + 0.5) * cell_px, y=(row + 0.5) * cell_px))
    return scene


def draw_scene(scene, image_px, background, supersample=4):
    """The scene as a PIL image, drawn large and downsampled for smooth edges."""
    canvas = Image.new('RGB', (image_px * supersample,) * 2, (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for obj in scene:
        draw_shape(draw, obj['shape'], obj['x'] * supersample, obj['y'] * supersample,
                   obj['radius'] * supersample, COLORS[obj['color']])
    return canvas.resize((image_px, image_px), Image.LANCZOS)


def draw_shape(draw, shape, x, y, r, fill):
    """One shape of radius r centred at (x, y), in canvas pixels."""
    if shape == 'circle':
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == 'square':
        draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    elif shape == 'triangle':
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def position(obj):
    return POSITIONS[obj['row']][obj['col']]


def place(obj):
    return PLACES.get(position(obj), f"at the {position(obj)}")


def caption(scene):
    """'a large red circle at the top left and a small blue square in the center'"""
    phrases = [f"a {o['size']} {o['color']} {o['shape']} {place(o)}" for o in scene]
    return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def scene_words(scene):
    """The scene as 9 words, one per cell in reading order: 'empty' or '<size>_<color>_<shape>'. One word per
    object, as one visual token per cell carries the object: what the tiny LM reads in text.json."""
    words = ['empty'] * 9
    for obj in scene:
        words[obj['row'] * 3 + obj['col']] = f"{obj['size']}_{obj['color']}_{obj['shape']}"
    return ' '.join(words)


def shape_ref(obj, scene):
    """'the circle', or 'the circle at the top left' when the scene has more than one circle"""
    unique = sum(o['shape'] == obj['shape'] for o in scene) == 1
    return f"the {obj['shape']}" + ('' if unique else f" {place(obj)}")


def color_ref(obj, scene):
    unique = sum(o['color'] == obj['color'] for o in scene) == 1
    return f"the {obj['color']} object" + ('' if unique else f" {place(obj)}")


def both_ref(obj, scene):
    return f"the {obj['color']} {obj['shape']}"


def pick(scene, rng, ref):
    """A random object of those that ref (shape_ref, color_ref, both_ref) names unambiguously, None if none is:
    in the grid world every object (distinct colour-shape pairs, one per cell); a lab scene may repeat a colour,
    a shape, even a colour-shape pair in one cell. Same draw as rng.choice(scene) when all are named."""
    named = [o for o in scene if sum(ref(p, scene) == ref(o, scene) for p in scene) == 1]
    return rng.choice(named) if named else None


def absent_categories(scene):
    present = {(o['color'], o['shape']) for o in scene}
    return [c for c in CATEGORIES if c not in present]


# GQA's `semantic` field: the question as a functional program, a list of steps {operation, argument,
# dependencies} (GQA's select / filter <attribute> / query / verify <attribute> / choose <attribute> / exist),
# each reading the steps it depends on. A select's argument names what it selects and, in brackets, the ids
# (the object's index in its scene, as in the scene graphs) of the object(s) the question refers to, '-' if none.

def step(operation, argument, *dependencies):
    return {'operation': operation, 'argument': argument, 'dependencies': list(dependencies)}


def object_ids(objects, scene):
    return ','.join(str(scene.index(o)) for o in objects) or '-'


def refer(obj, scene, by):
    """The steps that find obj as shape_ref ('shape'), color_ref ('color') or 'the red circle' ('both') say it:
    select its shape (or any object), filter its colour, then its position where that is still ambiguous."""
    steps = [step('select', f"{obj['shape'] if by != 'color' else 'object'} ({scene.index(obj)})")]
    if by != 'shape':
        steps.append(step('filter color', obj['color'], len(steps) - 1))
    same = {'shape': 'shape', 'color': 'color'}.get(by)
    if same and sum(o[same] == obj[same] for o in scene) > 1:
        steps.append(step('filter position', position(obj), len(steps) - 1))
    return steps


def then(steps, operation, argument):
    """steps + one final step that reads the last of them"""
    return steps + [step(operation, argument, len(steps) - 1)]


# Question families: (scene, rng) -> (question, answer, GQA types (structural, semantic, detailed), GQA
# semantic program), or None where the family cannot ask about the scene (no object it can name unambiguously:
# crowded lab scenes). Answers are lower case; yes/no families say yes half the time. The program adds no
# random draw, so the data stay those of the seed.

def ask_exist_object(scene, rng):
    if rng.random() < 0.5:
        obj = rng.choice(scene)
        color, shape, answer = obj['color'], obj['shape'], 'yes'
    else:  # half of the negatives share a colour or shape with an object in the image (harder)
        absent = absent_categories(scene)
        related = [c for c in absent if any(c[0] == o['color'] or c[1] == o['shape'] for o in scene)]
        pool = related if related and rng.random() < 0.5 else absent
        # drawn as often as the category appears, like the positives: the name alone must not tell the answer
        (color, shape), answer = rng.choices(pool, weights=[POPULARITY[c] for c in pool])[0], 'no'
    found = [o for o in scene if (o['color'], o['shape']) == (color, shape)]
    program = [step('select', f"{shape} ({object_ids(found, scene)})"), step('filter color', color, 0),
               step('exist', '?', 1)]
    return f"Is there a {color} {shape} in the image?", answer, ('verify', 'obj', 'existAttrC'), program


def ask_exist_shape(scene, rng):
    present = sorted({o['shape'] for o in scene}, key=SHAPES.index)
    absent = [s for s in SHAPES if s not in present]
    yes = not absent or rng.random() < 0.5
    shape = rng.choice(present if yes else absent)
    program = [step('select', f"{shape} ({object_ids([o for o in scene if o['shape'] == shape], scene)})"),
               step('exist', '?', 0)]
    return f"Is there a {shape} in the image?", 'yes' if yes else 'no', ('verify', 'obj', 'existC'), program


def select_all(scene, where, name='object'):
    """A select step of every object for which where(obj) holds: what a count or how-many question refers to."""
    return step('select', f"{name} ({object_ids([o for o in scene if where(o)], scene)})")


def ask_count(scene, rng):
    """Digits as answers, in both worlds: the same question must not have two answer forms."""
    kind = rng.choice(('shape', 'color', 'all'))
    if kind == 'shape':
        shape = rng.choice(SHAPES)
        return (f"How many {shape}s are there?", str(sum(o['shape'] == shape for o in scene)),
                ('query', 'obj', 'count'),
                [select_all(scene, lambda o: o['shape'] == shape, shape), step('count', 'number', 0)])
    if kind == 'color':
        color = rng.choice([o['color'] for o in scene])
        return (f"How many {color} objects are there?", str(sum(o['color'] == color for o in scene)),
                ('query', 'attr', 'count'), [select_all(scene, lambda o: o['color'] == color),
                                             step('filter color', color, 0), step('count', 'number', 1)])
    return ("How many objects are there?", str(len(scene)), ('query', 'obj', 'count'),
            [select_all(scene, lambda o: True), step('count', 'number', 0)])


def count_question(shape, n):
    if n == 1:
        return f"Is there only one {shape} in the image?"
    return f"Are there {LAB_NUMBER_WORDS[n]} {shape}s in the image?"


def most_objects(scene):
    """How many objects a scene of its world can hold: a lab scene's objects have a texture."""
    return LAB_MAX_OBJECTS if 'texture' in scene[0] else GRID_MAX_OBJECTS


def ask_count_verify(scene, rng):
    shape = rng.choice([o['shape'] for o in scene])
    n = sum(o['shape'] == shape for o in scene)
    if rng.random() < 0.5:
        m, answer = n, 'yes'
    else:  # one off, never past what the world can hold
        m, answer = rng.choice([m for m in (n - 1, n + 1) if 1 <= m <= most_objects(scene)]), 'no'
    return (count_question(shape, m), answer, ('verify', 'obj', 'verifyCount'),
            [select_all(scene, lambda o: o['shape'] == shape, shape), step('verify count', str(m), 0)])


def ask_color(scene, rng):
    if (obj := pick(scene, rng, shape_ref)) is None:
        return None
    return (f"What color is {shape_ref(obj, scene)}?", obj['color'], ('query', 'attr', 'queryAttr'),
            then(refer(obj, scene, 'shape'), 'query', 'color'))


def ask_shape(scene, rng):
    if (obj := pick(scene, rng, color_ref)) is None:
        return None
    return (f"What shape is {color_ref(obj, scene)}?", obj['shape'], ('query', 'cat', 'queryObject'),
            then(refer(obj, scene, 'color'), 'query', 'shape'))


def ask_where(scene, rng):
    if (obj := pick(scene, rng, both_ref)) is None:
        return None
    return (f"Where is the {obj['color']} {obj['shape']}?", position(obj), ('query', 'rel', 'queryPosition'),
            then(refer(obj, scene, 'both'), 'query', 'position'))


def object_sides(obj):
    return [side for side, holds in (('left', obj['col'] == 0), ('right', obj['col'] == 2),
                                     ('top', obj['row'] == 0), ('bottom', obj['row'] == 2)) if holds]


def ask_side(scene, rng):
    if (obj := pick(scene, rng, both_ref)) is None:
        return None
    true_sides = object_sides(obj)
    yes = bool(true_sides) and rng.random() < 0.5
    side = rng.choice(true_sides if yes else [s for s in SIDES if s not in true_sides])
    axis = 'hposition' if side in ('left', 'right') else 'vposition'
    return (f"Is the {obj['color']} {obj['shape']} {SIDES[side]}?", 'yes' if yes else 'no',
            ('verify', 'rel', 'verifyPosition'), then(refer(obj, scene, 'both'), f'verify {axis}', side))


def ask_size(scene, rng):
    if (obj := pick(scene, rng, both_ref)) is None:
        return None
    return (f"What size is the {obj['color']} {obj['shape']}?", obj['size'], ('query', 'attr', 'querySize'),
            then(refer(obj, scene, 'both'), 'query', 'size'))


def ask_choose(scene, rng):
    if (obj := pick(scene, rng, shape_ref)) is None:
        return None
    other = rng.choice([c for c in COLORS if c != obj['color']])
    first, second = rng.sample([obj['color'], other], 2)
    return (f"Is {shape_ref(obj, scene)} {first} or {second}?", obj['color'], ('choose', 'attr', 'chooseAttr'),
            then(refer(obj, scene, 'shape'), 'choose color', f'{first}|{second}'))


GQA_FAMILIES = (ask_exist_object, ask_exist_shape, ask_side, ask_color, ask_shape, ask_where, ask_size, ask_choose)
INSTRUCT_FAMILIES = GQA_FAMILIES + (ask_count, ask_count_verify)


def ask_each(drawn, families, scene, rng):
    """Each drawn family's question about the scene, in turn (a generator, so the caller's own draws between
    questions keep their place in the stream). One that cannot ask here (None) gives way to one of `families` not
    drawn, at random: a crowded lab scene still gets its number of questions; the grid world never needs it."""
    spare = [ask for ask in families if ask not in drawn]
    for ask in drawn:
        asked = ask(scene, rng)
        while asked is None and spare:
            asked = spare.pop(rng.randrange(len(spare)))(scene, rng)
        if asked is not None:
            yield asked


def co_occurring(absent, present, k, rng, cooccurrence):
    """POPE's adversarial negatives: the k absent categories most often seen with the present ones."""
    return sorted(absent, key=lambda c: -sum(cooccurrence[p, c] for p in present))[:k]


# A world: how its scenes are sampled, drawn and captioned, what POPE calls its objects (category: an object's
# key, object_name: its words, adversarial: POPE's hard negatives), the families GQA and instruct.json ask, and
# how the scene is written in words (None: it is not). The writers below take one, so the grid world and the
# lab (LAB, at the end) are written one way.
World = namedtuple('World', 'sample draw caption category categories object_name adversarial gqa_families '
                            'instruct_families in_words')
GRID = World(sample_scene, draw_scene, caption, lambda o: (o['color'], o['shape']), CATEGORIES, ' '.join, co_occurring,
             GQA_FAMILIES, INSTRUCT_FAMILIES, scene_words)


def instruct_turn(question, answer, rng):
    """One human/gpt pair as LLaVA-1.5's mix phrases short answers; yes/no answers are 'Yes' / 'No'."""
    if answer in ('yes', 'no'):
        return question + (YES_NO if rng.random() < 0.4 else SHORT_ANSWER), answer.capitalize()
    return question + SHORT_ANSWER, answer


def conversation(turns, image):
    """LLaVA conversations from (question, answer) pairs; '<image>\\n' leads the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        prefix = IMAGE_TEXT + '\n' if image and i == 0 else ''
        conversations += [{'from': 'human', 'value': prefix + question}, {'from': 'gpt', 'value': answer}]
    return conversations


def write_json(path, obj):
    """One line, as LLaVA's and GQA's files are (json.dumps without an indent is the fast C encoder: json.dump and
    any indent use the pure-Python one, which took about a fifth of prepare_shapes' time under cProfile)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(json.dumps(obj))


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)


def save_scenes(rng, count, image_px, folder, name, world=GRID):
    """Draw `count` new scenes of the world (default: the grid) into folder/name(i); returns [(file name, scene)].
    The scenes and backgrounds come from rng first, one after another, so the files do not depend on how many
    threads draw them; one thread per core then draws and saves (PIL's resize and PNG encoder, most of the time,
    release the GIL)."""
    os.makedirs(folder, exist_ok=True)
    saved, backgrounds = [], []
    for i in range(count):
        saved.append((name(i), world.sample(rng, image_px)))
        backgrounds.append(rng.randint(20, 60))

    def draw_and_save(file, scene, background):
        world.draw(scene, image_px, background).save(os.path.join(folder, file))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(draw_and_save, *zip(*saved), backgrounds))  # list(): a failed drawing raises here
    return saved


def question_turns(scene, rng, questions_per_image, caption_prob, always=(), world=GRID):
    """(question, answer) turns about one scene: a few of the world's question families, plus each family in
    `always` that was not drawn (then all in a random order), then a caption turn at caption_prob"""
    families = rng.sample(world.instruct_families, rng.randint(*questions_per_image))
    if always:
        families += [ask for ask in always if ask not in families]
        rng.shuffle(families)
    turns = [instruct_turn(question, answer, rng)
             for question, answer, *_ in ask_each(families, world.instruct_families, scene, rng)]
    if rng.random() < caption_prob:
        turns.append((rng.choice(DESCRIBE), world.caption(scene)))
    return turns


TEXT_ALWAYS = (ask_where, ask_side)  # position in every text conversation: with 3-5 of 10 families drawn at random,
# 2 seeds of 5 learnt neither "where" nor the yes/no side question in words, nor then on images; asked in every
# conversation (and 3 epochs, config/shapes_lm.py), all 5 seeds learnt both (docs/log.md, "Two epochs of the sampled question mix in the text step").


def make_text_data(out_dir, rng, num_conversations, questions_per_image, caption_prob):
    """text.json: instruct.json's conversations about new scenes that are written, not drawn: the scene's
    words stand where '<image>' would, and each also asks the TEXT_ALWAYS families. It is the tiny LM's
    pretraining (config/shapes_lm.py), no image in it."""
    text = []
    for i in range(num_conversations):
        scene = sample_scene(rng, image_px=64)  # the pixel size only scales radii: the words do not show them
        turns = question_turns(scene, rng, questions_per_image, caption_prob, always=TEXT_ALWAYS)
        conversations = conversation(turns, image=False)
        conversations[0]['value'] = scene_words(scene) + '\n' + conversations[0]['value']
        text.append({'id': f'text_scene_{i:06d}', 'conversations': conversations})
    write_json(os.path.join(out_dir, 'text.json'), text)
    return text


def make_training_data(out_dir, rng, num_images, image_px, questions_per_image, caption_prob, mixed_in=()):
    """pretrain.json (captions, stage 1) and instruct.json (multi-turn QA + text-only, stage 2, shuffled together
    with the samples mixed_in: the lab's). Returns pretrain and the grid world's instruct samples."""
    pretrain, instruct = [], []
    for file, scene in save_scenes(rng, num_images, image_px, os.path.join(out_dir, 'images'), '{:06d}.png'.format):
        sample_id = file[:-len('.png')]
        describe = rng.choice(DESCRIBE)  # LCS-558K puts <image> before or after the instruction
        human = IMAGE_TEXT + '\n' + describe if rng.random() < 0.5 else describe + '\n' + IMAGE_TEXT
        pretrain.append({'id': sample_id, 'image': file, 'conversations': [
            {'from': 'human', 'value': human}, {'from': 'gpt', 'value': caption(scene)}]})
        turns = question_turns(scene, rng, questions_per_image, caption_prob)
        instruct.append({'id': sample_id, 'image': file, 'conversations': conversation(turns, image=True)})
    for i in range(max(1, num_images // 50)):  # text-only samples, like the ShareGPT part of LLaVA's mix
        turns = [instruct_turn(question, answer, rng) for question, answer in rng.sample(TEXT_ONLY, 2)]
        instruct.append({'id': f'text_{i:05d}', 'conversations': conversation(turns, image=False)})
    mixed = instruct + list(mixed_in)
    rng.shuffle(mixed)
    write_json(os.path.join(out_dir, 'pretrain.json'), pretrain)
    write_json(os.path.join(out_dir, 'instruct.json'), mixed)
    return pretrain, instruct


def pope_negatives(scene, k, split, rng, frequency, cooccurrence, world=GRID):
    """k absent categories: random, the most frequent ('popular'), or the world's adversarial ones, as POPE
    samples its negatives. Ties go to the order of world.categories."""
    present = [world.category(o) for o in scene]
    absent = [c for c in world.categories if c not in present]
    if split == 'random':
        return rng.sample(absent, k)
    if split == 'popular':
        return sorted(absent, key=lambda c: -frequency[c])[:k]
    return world.adversarial(absent, present, k, rng, cooccurrence)


def make_pope(eval_dir, rng, num_images, image_px, world=GRID):
    """POPE: 'Is there a <object> in the image?' with 3 (or fewer) present objects per image and as
    many absent ones per split; the splits share the positives and differ in the negatives."""
    images = save_scenes(rng, num_images, image_px, os.path.join(eval_dir, 'pope', 'val2014'), 'pope_{:05d}.png'.format,
                         world)
    frequency, cooccurrence = Counter(), Counter()
    for _, scene in images:
        categories = [world.category(o) for o in scene]
        frequency.update(categories)
        cooccurrence.update((a, b) for a in categories for b in categories if a != b)
    distinct = [list(dict.fromkeys(world.category(o) for o in scene)) for _, scene in images]  # lab: may repeat
    positives = [rng.sample(present, min(3, len(present))) for present in distinct]
    questions, question_id = [], 0
    for split in ('random', 'popular', 'adversarial'):
        annotations = []
        for (file, scene), present in zip(images, positives):
            negatives = pope_negatives(scene, len(present), split, rng, frequency, cooccurrence, world)
            for category, label in [(c, 'yes') for c in present] + [(c, 'no') for c in negatives]:
                text = f"Is there a {world.object_name(category)} in the image?"
                questions.append({'question_id': question_id, 'image': file, 'text': text + SHORT_ANSWER,
                                  'category': split})
                annotations.append({'question_id': question_id, 'image': file, 'text': text, 'label': label})
                question_id += 1
        write_jsonl(os.path.join(eval_dir, 'pope', 'coco', f'coco_pope_{split}.json'), annotations)
    write_jsonl(os.path.join(eval_dir, 'pope', 'llava_pope_test.jsonl'), questions)
    return questions


def program_facts(program, answer):
    """(needs, tells) of a GQA question, as sets of (object id, attribute): what must be known to answer it,
    and what the question and its answer give away: what it refers by and, unless it is a verify answered
    'no', what it asks. A known position tells both sides (hposition, vposition). A question about no object
    or several (select '-' or 'a,b'), or a count (of however many), needs and tells nothing here, so it entails
    and is entailed by nothing."""
    select = program[0]['argument']
    ids = select[select.index('(') + 1:-1]
    if not ids.isdigit() or program[-1]['operation'].endswith('count'):
        return set(), set()
    i = int(ids)
    refers = {(i, 'shape')} if not select.startswith('object ') else set()
    refers |= {(i, s['operation'].split()[1]) for s in program if s['operation'].startswith('filter ')}
    last = program[-1]
    if last['operation'] == 'exist':
        return refers, refers
    asked = {(i, last['argument'] if last['operation'] == 'query' else last['operation'].split()[1])}
    tells = refers if last['operation'].startswith('verify') and answer == 'no' else refers | asked
    tells |= {(j, side) for j, a in tells if a == 'position' for side in ('hposition', 'vposition')}
    return refers | asked, tells


def answer_choices(program):
    """GQA's choices: the answers that fit the question ('valid') and those that make sense in this world
    ('plausible'). Every colour, size, position (and texture) occurs with every shape here, so the two are the
    same."""
    last = program[-1]
    if last['operation'] == 'exist' or last['operation'].startswith('verify'):
        valid = ['yes', 'no']
    elif last['operation'].startswith('choose'):
        valid = last['argument'].split('|')
    else:
        valid = {'color': list(COLORS), 'shape': list(SHAPES), 'size': list(SIZES), 'texture': list(TEXTURES),
                 'position': [p for row in POSITIONS for p in row],
                 'number': [str(n) for n in range(len(LAB_NUMBER_WORDS))]}[last['argument']]
    return {'valid': valid, 'plausible': valid}


def scene_graph(scene, image_px):
    """GQA's scene graph of an image: objects by id (index in the scene) with name, box and attributes (colour,
    size and, in the lab, texture)."""
    objects = {str(i): {'name': o['shape'], 'x': round(o['x'] - o['radius']), 'y': round(o['y'] - o['radius']),
                        'w': round(2 * o['radius']), 'h': round(2 * o['radius']),
                        'attributes': [o[a] for a in ('color', 'size', 'texture') if a in o], 'relations': []}
               for i, o in enumerate(scene)}
    return {'width': image_px, 'height': image_px, 'objects': objects}


def make_gqa(eval_dir, rng, num_images, image_px, questions_per_image=3, world=GRID):
    """GQA-style: LLaVA's question jsonl and GQA's testdev_balanced_questions.json with every field GQA's
    eval.py reads (types, semantic, groups, entailed), plus its choices and scene-graph files. `entailed`
    lists the image's other questions whose answers follow from this one's (program_facts); `groups.global`
    is the kind of answer an open or choose question asks for (GQA's distribution metric), None for yes/no.
    Also, where the world writes scenes in words (the grid: scene_words), the same questions about the same
    scenes in words, no image: the text step's GQA. Returns the question records of both jsonl files."""
    images = save_scenes(rng, num_images, image_px, os.path.join(eval_dir, 'gqa', 'images'), 'n{:05d}.png'.format,
                         world)
    questions, words_questions, gqa, choices, scenes = [], [], {}, {}, {}
    families = world.gqa_families
    for file, scene in images:
        image_id, facts = file[:-len('.png')], {}
        drawn = rng.sample(families, questions_per_image)
        for question, answer, (structural, semantic, detailed), program in ask_each(drawn, families, scene, rng):
            question_id = str(20000000 + len(questions))
            questions.append({'question_id': question_id, 'image': file, 'text': question + SHORT_ANSWER})
            if world.in_words:
                words_questions.append({'question_id': question_id,
                                        'text': world.in_words(scene) + '\n' + question + SHORT_ANSWER})
            asks_for = program[-1]['argument'] if structural == 'query' else program[-1]['operation'].split()[-1]
            gqa[question_id] = {'imageId': image_id, 'question': question, 'answer': answer,
                                'fullAnswer': answer, 'isBalanced': True,
                                'types': {'structural': structural, 'semantic': semantic, 'detailed': detailed},
                                'semantic': program,
                                'groups': {'global': None if structural == 'verify' else asks_for,
                                           'local': f"{detailed}-{program[0]['argument'].split(' (')[0]}"}}
            choices[question_id] = answer_choices(program)
            facts[question_id] = program_facts(program, answer)
        for question_id, (_, tells) in facts.items():
            gqa[question_id]['entailed'] = [other for other, (needs, _) in facts.items()
                                            if other != question_id and needs and needs <= tells]
        scenes[image_id] = scene_graph(scene, image_px)
    gqa_dir = os.path.join(eval_dir, 'gqa')
    write_jsonl(os.path.join(gqa_dir, 'llava_gqa_testdev_balanced.jsonl'), questions)
    if world.in_words:
        write_jsonl(os.path.join(gqa_dir, 'llava_gqa_testdev_balanced_words.jsonl'), words_questions)
    write_json(os.path.join(gqa_dir, 'testdev_balanced_questions.json'), gqa)
    write_json(os.path.join(gqa_dir, 'testdev_balanced_choices.json'), choices)
    write_json(os.path.join(gqa_dir, 'testdev_balanced_sceneGraphs.json'), scenes)
    return questions, words_questions


def mme_pair(subtask, scene, rng):
    """MME's two questions for one image, (question, 'Yes'), (question, 'No'); None if the scene cannot
    give both (no absent shape, no object off-centre, ...)."""
    obj = rng.choice(scene)
    if subtask == 'existence':
        absent = [s for s in SHAPES if s not in {o['shape'] for o in scene}]
        if not absent:
            return None
        yes, no = f"Is there a {obj['shape']} in the image?", f"Is there a {rng.choice(absent)} in the image?"
    elif subtask == 'count':
        n = sum(o['shape'] == obj['shape'] for o in scene)
        wrong = rng.choice([m for m in (n - 1, n + 1) if 1 <= m <= 4])
        yes, no = count_question(obj['shape'], n), count_question(obj['shape'], wrong)
    elif subtask == 'position':
        opposite = {'left': 'right', 'right': 'left', 'top': 'bottom', 'bottom': 'top'}
        if not object_sides(obj):
            return None
        side = rng.choice(object_sides(obj))
        ref = f"the {obj['color']} {obj['shape']}"
        yes, no = f"Is {ref} {SIDES[side]}?", f"Is {ref} {SIDES[opposite[side]]}?"
    else:  # color: the same shape in a colour it does not have here
        wrong = [c for c in COLORS if (c, obj['shape']) in absent_categories(scene)]
        yes = f"Is there a {obj['color']} {obj['shape']} in the image?"
        no = f"Is there a {rng.choice(wrong)} {obj['shape']} in the image?"
    return (yes + YES_NO, 'Yes'), (no + YES_NO, 'No')


def make_mme(eval_dir, rng, num_images, image_px):
    """MME-style: MME_Benchmark_release_version/<subtask>/{images/NNNN.png, questions_answers_YN/NNNN.txt}
    (lines 'question<TAB>Yes|No') and LLaVA's llava_mme.jsonl."""
    root = os.path.join(eval_dir, 'mme', 'MME_Benchmark_release_version')
    questions = []
    for subtask in ('existence', 'count', 'position', 'color'):
        os.makedirs(os.path.join(root, subtask, 'images'), exist_ok=True)
        os.makedirs(os.path.join(root, subtask, 'questions_answers_YN'), exist_ok=True)
        for i in range(num_images):
            scene, pair = None, None
            while pair is None:
                scene = sample_scene(rng, image_px)
                pair = mme_pair(subtask, scene, rng)
            image = f'{subtask}/images/{i:04d}.png'
            draw_scene(scene, image_px, background=rng.randint(20, 60)).save(os.path.join(root, image))
            with open(os.path.join(root, subtask, 'questions_answers_YN', f'{i:04d}.txt'), 'w') as f:
                f.writelines(f'{question}\t{answer}\n' for question, answer in pair)
            questions += [{'question_id': f'{image}#{k}', 'image': image, 'text': question, 'category': subtask}
                          for k, (question, _) in enumerate(pair)]
    write_jsonl(os.path.join(eval_dir, 'mme', 'llava_mme.jsonl'), questions)
    return questions


def build_word_tokenizer(texts, appended_texts=()):
    """A word-level HF tokenizer for exactly the words in `texts` and `appended_texts`: splits on whitespace and
    punctuation ('Yes.' -> 'Yes', '.'), decodes words joined by spaces with no space before punctuation.
    eos <|endoftext|> (the phi template's eos), pad <pad>, unk <unk>; no bos, like Phi-2. Ids: the specials, the
    words of `texts` sorted, then the other words of `appended_texts` sorted, so that appending (the lab's words)
    keeps the ids an LM trained without them (weights/shapes-lm) knows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pre_tokenizer = pre_tokenizers.Whitespace()
    # each distinct text once: the shapes world's 590 000 turns are 62 000 texts (10 s -> 2 s on a busy core)
    words_of = lambda texts: {word for text in set(texts) for word, _ in pre_tokenizer.pre_tokenize_str(text)}
    words = sorted(words_of(texts))
    words += sorted(words_of(appended_texts) - set(words))
    vocab = {token: i for i, token in enumerate(['<|endoftext|>', '<pad>', '<unk>'] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix='##', cleanup=True)  # cleanup: "Yes ." -> "Yes."
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|endoftext|>', pad_token='<pad>',
                                   unk_token='<unk>')


def prepare_shapes(out_dir='data/shapes', seed=0, num_train_images=12000, num_pope_images=80,
                   num_gqa_images=100, num_mme_images=20, image_px=64, questions_per_image=(3, 5), caption_prob=0.5,
                   num_text_conversations=40000, num_lab_train_images=4000, num_lab_pope_images=200,
                   num_lab_gqa_images=1000, lab_image_px=128):
    """Write the shapes world, deterministic by seed (each part has its own random stream, so changing
    one size leaves the other parts as they were). Images are image_px-square PNGs of 1-4 non-overlapping
    objects: 4 shapes x 6 colours x 2 sizes in a 3x3 grid of positions. The benchmarks use their own
    images, none of which is used for training. Also the lab (the end of this file): lab_image_px-square
    scenes of 1-8 objects anywhere, with textures, in instruct.json and in harder POPE and GQA under eval/lab;
    all num_lab_* 0 writes exactly the grid world alone. Layout (eval.py reads it; LLaVA's file names):

    out_dir/
      images/NNNNNN.png                     training images (pretrain and instruct share them)
      images/lab_NNNNNN.png                 the lab's training images (instruct only)
      pretrain.json                         stage 1: captions, LLaVA format [{id, image, conversations}]
      instruct.json                         stage 2: 3-6 turn QA (existence, colour, shape, count, position,
                                            size) + text-only samples (no "image" key), shuffled together with
                                            the lab's (id lab_NNNNNN: 3-6 turns of LAB_FAMILIES, lab captions)
      text.json                             the tiny LM's pretraining (config/shapes_lm.py): the same kind of
                                            conversations about scenes written as 9 words (scene_words), no images,
                                            each also asking "where" and the side question (TEXT_ALWAYS)
      tokenizer/                            word-level HF tokenizer (AutoTokenizer.from_pretrained): the grid
                                            world's words, then the lab's new ones (texture words, five-eight...)
      eval/pope/llava_pope_test.jsonl       {question_id (int), image, text, category: random|popular|adversarial}
      eval/pope/coco/coco_pope_{random,popular,adversarial}.json
                                            jsonl {question_id, image, text, label: yes|no}, same question_ids
                                            and order as that category's lines in llava_pope_test.jsonl
      eval/pope/val2014/pope_NNNNN.png
      eval/gqa/llava_gqa_testdev_balanced.jsonl   {question_id (str), image, text}
      eval/gqa/testdev_balanced_questions.json    {question_id: {imageId, question, answer (lower case),
                                            fullAnswer, isBalanced, types: {structural, semantic, detailed},
                                            semantic: [{operation, argument, dependencies}], groups: {global,
                                            local}, entailed: [question_id]}}
                                            structural: verify (yes/no) | query | choose
      eval/gqa/testdev_balanced_choices.json      {question_id: {valid, plausible}} (GQA's validity, plausibility)
      eval/gqa/testdev_balanced_sceneGraphs.json  {imageId: {width, height, objects: {id: {name, x, y, w, h,
                                            attributes: [colour, size], relations: []}}}}
      eval/gqa/images/nNNNNN.png
      eval/gqa/llava_gqa_testdev_balanced_words.jsonl   the same questions (same ids, scored by the same
                                            testdev_balanced_questions.json) about the same scenes written in
                                            words, as text.json writes them: {question_id, text: scene_words +
                                            '\\n' + question}, no image. What the text step learnt, per family
      eval/mme/llava_mme.jsonl              {question_id: '<subtask>/images/NNNN.png#k', image (the same
                                            without '#k', relative to MME_Benchmark_release_version), text,
                                            category: subtask}; k = line of the question in its txt
      eval/mme/MME_Benchmark_release_version/<subtask>/images/NNNN.png
      eval/mme/MME_Benchmark_release_version/<subtask>/questions_answers_YN/NNNN.txt
                                            two lines 'question<TAB>Yes' and 'question<TAB>No'
                                            subtasks: existence, count, position, color
      eval/lab/pope/...                     the lab's POPE, eval/pope's files: 'Is there a red circle with
                                            vertical texture in the image?'; adversarial: a present object with
                                            one of colour, shape, texture changed
      eval/lab/gqa/...                      the lab's GQA, eval/gqa's files but the words one; attributes
                                            [colour, size, texture]; types.detailed names each lab family
                                            (queryTexture, verifyTexture, verifyBinding, count, verifyCount,
                                            existDescribed) and the reused grid ones

    Question texts in the jsonl files have no '<image>' (eval adds '<image>\\n'); POPE and GQA end with
    LLaVA's "\\nAnswer the question using a single word or phrase.", MME with " Please answer yes or no."."""
    stream = lambda part: random.Random(f'{seed}-{part}')  # str seeds hash deterministically (sha512)
    eval_dir, lab_dir = os.path.join(out_dir, 'eval'), os.path.join(out_dir, 'eval', 'lab')
    lab_instruct = make_lab_instruct(out_dir, stream('lab-train'), num_lab_train_images, lab_image_px,
                                     questions_per_image, caption_prob)
    pretrain, instruct = make_training_data(out_dir, stream('train'), num_train_images, image_px,
                                           questions_per_image, caption_prob, mixed_in=lab_instruct)
    text = make_text_data(out_dir, stream('text'), num_text_conversations, questions_per_image, caption_prob)
    pope = make_pope(eval_dir, stream('pope'), num_pope_images, image_px)
    gqa, gqa_words = make_gqa(eval_dir, stream('gqa'), num_gqa_images, image_px)
    mme = make_mme(eval_dir, stream('mme'), num_mme_images, image_px)
    lab_pope, lab_gqa = [], []  # none: no eval/lab at all, as before the lab
    if num_lab_pope_images:
        lab_pope = make_pope(lab_dir, stream('lab-pope'), num_lab_pope_images, lab_image_px, LAB)
    if num_lab_gqa_images:
        lab_gqa, _ = make_gqa(lab_dir, stream('lab-gqa'), num_lab_gqa_images, lab_image_px, world=LAB)
    texts = [SYSTEM, 'USER: ASSISTANT:', ' '.join(NUMBER_WORDS), '0 1 2 3 4 5 6 7 8 9']
    texts += [turn['value'] for sample in pretrain + instruct + text for turn in sample['conversations']]
    texts += [q['text'] for q in pope + gqa + gqa_words + mme]
    lab_texts = [turn['value'] for sample in lab_instruct for turn in sample['conversations']]
    lab_texts += [q['text'] for q in lab_pope + lab_gqa]
    tokenizer = build_word_tokenizer(texts, lab_texts + [LAB_WORDS] if lab_texts else [])
    tokenizer.save_pretrained(os.path.join(out_dir, 'tokenizer'))
    summary = dict(pretrain=len(pretrain), instruct=len(instruct) + len(lab_instruct), text=len(text), pope=len(pope),
                   gqa=len(gqa), mme=len(mme), lab_instruct=len(lab_instruct), lab_pope=len(lab_pope),
                   lab_gqa=len(lab_gqa), vocab=len(tokenizer))
    print(f"wrote {out_dir}: " + ', '.join(f'{k} {v}' for k, v in summary.items()))
    return summary


# -----------------------------------------------------------------------------
# The lab world: scenes whose factors need different towers. Anywhere in the image, up to 8 objects, some
# overlapping, each with a fine texture of 4-px period at 128 px: 3 px at ConvNeXt's 96, 1.5 px at the ViTs' 48, where
# the resize blurs most of it away (mostly, not all: a logistic regression on the grey pixels around each object reads
# the texture 56 % of the time at 48 px, 81 % at 64, 94 % at 96, 98 % at 128; chance 25 %). towers.py pretrains and probes the tiny towers on it; prepare_shapes asks about it (its own
# question families below) in instruct.json and in harder POPE and GQA benchmarks (eval/lab).

TEXTURES = ('vertical', 'horizontal', 'checked', 'diagonal')
LAB_MAX_OBJECTS = 8
TEXTURE_INK = (20, 20, 20)


def sample_lab_scene(rng, image_px, max_objects=LAB_MAX_OBJECTS):
    """1-max_objects objects of any colour, shape, size and texture (repeats allowed), centred anywhere in the
    image; two centres stay at least 0.75 (r1 + r2) apart, so objects overlap a little but none hides another.
    An object that finds no room in 100 tries is left out (len(scene) is the count). Row/col: the 3x3 cell
    holding the centre, the grid world's position words."""
    scene = []
    for _ in range(rng.randint(1, max_objects)):
        size = rng.choice(SIZES)
        radius = image_px * (0.075 if size == 'small' else 0.105) * rng.uniform(0.9, 1.1)
        for _ in range(100):
            x, y = rng.uniform(radius, image_px - radius), rng.uniform(radius, image_px - radius)
            if all(math.hypot(x - o['x'], y - o['y']) >= 0.75 * (radius + o['radius']) for o in scene):
                break
        else:
            continue
        scene.append(dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), size=size,
                          texture=rng.choice(TEXTURES), radius=radius, x=x, y=y,
                          row=min(int(3 * y / image_px), 2), col=min(int(3 * x / image_px), 2)))
    return scene


@functools.lru_cache(maxsize=None)  # a few dozen sizes: the lab's 5 000 images draw each once
def texture_mask(texture, side, period):
    """A side x side alpha mask (PIL 'L') of dark ink: stripes or checks of the given period, half ink, under a
    round raised-cosine window. Every texture then has the same mean under the same window, so below its period,
    blurred, each is the same soft grey blob; a hard-edged square would cut each pattern differently at its sides and
    leave a coarse trace (a pixel probe at 48 px read that 59 % of the time, chance 25 %). Diagonal: the period is
    across the stripes."""
    u, v = np.meshgrid(np.arange(side) + 0.5, np.arange(side) + 0.5)
    half = period / 2
    ink = {'vertical': (u // half) % 2, 'horizontal': (v // half) % 2,
           'checked': (u // half + v // half) % 2,
           'diagonal': ((u + v) / math.sqrt(2) // half) % 2}[texture]
    rho = np.hypot(u - side / 2, v - side / 2) / (side / 2)
    window = np.where(rho < 1, np.cos(np.pi * np.minimum(rho, 1) / 2) ** 2, 0)
    return Image.fromarray((255 * ink * window).round().astype(np.uint8))


def draw_lab_scene(scene, image_px, background, supersample=4, period_px=4):
    """The lab scene as a PIL image: draw_scene's shapes, in list order (later ones on top), each with a square of
    texture 0.9 r across at its centre (a triangle's: 0.3 r lower, in its wider part). The texture's period is
    4 px at 128 px: 3 px at ConvNeXt's 96, readable; 1.5 px at the ViTs' 48, under the 2 px that pixels can hold,
    so the resize blurs every texture to the same grey."""
    period = round(period_px * supersample)
    canvas = Image.new('RGB', (image_px * supersample,) * 2, (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for obj in scene:
        x, y, r = obj['x'] * supersample, obj['y'] * supersample, obj['radius'] * supersample
        draw_shape(draw, obj['shape'], x, y, r, COLORS[obj['color']])
        side = round(1.2 * r)
        cy = y + (0.2 * r if obj['shape'] == 'triangle' else 0)
        canvas.paste(TEXTURE_INK, (round(x - side / 2), round(cy - side / 2)), texture_mask(obj['texture'], side, period))
    return canvas.resize((image_px, image_px), Image.LANCZOS)


def lab_caption(scene):
    """'a large red circle with checked texture at the top left and a small blue square with vertical texture in
    the center',
    objects in reading order of their cells (then left to right)"""
    phrases = [f"a {o['size']} {o['color']} {o['shape']} with {o['texture']} texture {place(o)}"
               for o in sorted(scene, key=lambda o: (o['row'], o['col'], o['x']))]
    return ' and '.join(phrases)



# Lab questions: a texture (in the pixels at 96 px and up, mostly not at 48; no tower has learnt it yet: docs/lab.md),
# which colour goes with which shape (binding), counts up to 8 in crowded scenes, and objects named by all three of
# colour, shape and texture. An object is named by a description that is unique in its scene (pick); colours,
# shapes and textures repeat here.

LAB_CATEGORIES = [(color, shape, texture) for color, shape in CATEGORIES for texture in TEXTURES]  # lab POPE's objects
LAB_WORDS = ' '.join(('with', 'texture') + TEXTURES + LAB_NUMBER_WORDS)  # in the tokenizer whenever the lab is


def lab_category(obj):
    return obj['color'], obj['shape'], obj['texture']


def lab_object_name(category):
    """('red', 'circle', 'vertical') -> 'red circle with vertical texture'"""
    color, shape, texture = category
    return f"{color} {shape} with {texture} texture"


def near_misses(absent, present):
    """The absent categories one attribute away from a present one: the lab's hard negatives, which a model that
    sees colour, shape and texture but not which object has which calls present. Every present category has 11
    neighbours and at most 7 other objects stand by it, so there are always at least 4."""
    return [c for c in absent if any(sum(a != b for a, b in zip(c, p)) == 1 for p in present)]


def one_changed(absent, present, k, rng, cooccurrence):
    """The lab POPE's adversarial negatives: k near misses at random (POPE's co-occurrence says little here,
    every category being as likely as any other in any scene)."""
    return rng.sample(near_misses(absent, present), k)


def ask_texture(scene, rng):
    if (obj := pick(scene, rng, both_ref)) is None:
        return None
    return (f"What texture does {both_ref(obj, scene)} have?", obj['texture'], ('query', 'attr', 'queryTexture'),
            then(refer(obj, scene, 'both'), 'query', 'texture'))


def ask_texture_verify(scene, rng):
    if (obj := pick(scene, rng, both_ref)) is None:
        return None
    yes = rng.random() < 0.5
    texture = obj['texture'] if yes else rng.choice([t for t in TEXTURES if t != obj['texture']])
    return (f"Does {both_ref(obj, scene)} have {texture} texture?", 'yes' if yes else 'no',
            ('verify', 'attr', 'verifyTexture'), then(refer(obj, scene, 'both'), 'verify texture', texture))


def ask_binding(scene, rng):
    """'Is the red object a circle?' about the only red object, or 'Is the circle red?' about the only circle. A
    'no' names a shape (colour) that another object here has, where one does: seeing which colours and which
    shapes are in the image, and not which goes with which, then tells nothing."""
    for named_by, asked in rng.sample([('color', 'shape'), ('shape', 'color')], 2):
        named = [o for o in scene if sum(p[named_by] == o[named_by] for p in scene) == 1]
        if named:
            break
    else:
        return None
    obj = rng.choice(named)
    yes = rng.random() < 0.5
    elsewhere = [o[asked] for o in scene if o[asked] != obj[asked]]
    value = obj[asked] if yes else rng.choice(elsewhere or [v for v in {'color': COLORS, 'shape': SHAPES}[asked]
                                                            if v != obj[asked]])
    question = (f"Is the {obj['color']} object a {value}?" if named_by == 'color' else
                f"Is the {obj['shape']} {value}?")
    return (question, 'yes' if yes else 'no', ('verify', 'attr', 'verifyBinding'),
            then(refer(obj, scene, named_by), f'verify {asked}', value))


def ask_exist_described(scene, rng):
    """'Is there a red circle with vertical texture in the image?' (lab POPE's question); half of the negatives are
    near misses, one attribute away from an object in the image."""
    present = [lab_category(o) for o in scene]
    if rng.random() < 0.5:
        category, answer = rng.choice(present), 'yes'
    else:
        absent = [c for c in LAB_CATEGORIES if c not in present]
        category, answer = rng.choice(near_misses(absent, present) if rng.random() < 0.5 else absent), 'no'
    color, shape, texture = category
    found = [o for o in scene if lab_category(o) == category]
    program = [step('select', f"{shape} ({object_ids(found, scene)})"), step('filter color', color, 0),
               step('filter texture', texture, 1), step('exist', '?', 2)]
    return f"Is there a {lab_object_name(category)} in the image?", answer, ('verify', 'obj', 'existDescribed'), program


# the lab's own families, then the grid's that stay right on lab scenes (they name objects through pick; 'where'
# and the sides read the cell of the centre; counts go up to 8)
LAB_FAMILIES = (ask_texture, ask_texture_verify, ask_binding, ask_exist_described, ask_count, ask_count_verify,
                ask_exist_object, ask_exist_shape, ask_side, ask_color, ask_shape, ask_where, ask_size, ask_choose)
LAB = World(sample_lab_scene, draw_lab_scene, lab_caption, lab_category, LAB_CATEGORIES, lab_object_name, one_changed,
            LAB_FAMILIES, LAB_FAMILIES, None)


def make_lab_instruct(out_dir, rng, num_images, image_px, questions_per_image, caption_prob):
    """The lab's stage-2 samples, which make_training_data shuffles into instruct.json: images/lab_NNNNNN.png,
    each with a few LAB_FAMILIES questions (as many as a grid image gets) and, at caption_prob, a lab caption."""
    instruct = []
    images = save_scenes(rng, num_images, image_px, os.path.join(out_dir, 'images'), 'lab_{:06d}.png'.format, LAB)
    for file, scene in images:
        turns = question_turns(scene, rng, questions_per_image, caption_prob, world=LAB)
        instruct.append({'id': file[:-len('.png')], 'image': file, 'conversations': conversation(turns, image=True)})
    return instruct


if __name__ == '__main__':
    prepare_shapes()
