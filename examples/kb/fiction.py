"""A generated fictional world (documents and facts) for the KB example, its tests and benchmark.

The world (the Orvane Reach and, in Chinese, the 澜州 region) is written as several
documents of paragraphs, English and Chinese: town gazetteers and biographies. Each
fact is stated once in a document and asked by a question worded differently (other
verbs and nouns; the subject's name is what the two share), with the answer as it is
written in the document. Every answer occurs exactly once in the whole corpus, so a
retrieved chunk holds the answer if and only if it is the passage that states the fact.

Nothing here is true of the real world, so a model can only know it from the documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    """One fact: a question about it, its answer, the sentence and file that state it."""

    question: str
    answer: str
    sentence: str
    file: str
    language: str  # "en" or "zh"
    subject: str
    relation: str


_EN_PREFIX = ["Vel", "Ash", "Bri", "Cal", "Dun", "Elm", "Fal", "Gly", "Hal", "Ire", "Kel", "Lor",
              "Mal", "Nor", "Orr", "Pel", "Quen", "Ros", "Sar", "Tam", "Ul", "Var", "Wen", "Yor"]
_EN_SUFFIX = ["moor", "ford", "wick", "haven", "stead", "mere", "gate", "holm", "barrow", "crest"]
_EN_GIVEN = ["Oren", "Maelis", "Tobin", "Ysolde", "Corwin", "Edda", "Bram", "Liesel", "Perrin", "Sabine",
             "Aldric", "Wenna", "Garrick", "Ilse", "Hollis", "Renna", "Dorian", "Maud", "Fenwick", "Thessaly",
             "Quill", "Brisa", "Osric", "Talia", "Emeric", "Jessamy", "Lucan", "Nerys", "Piers", "Rowena"]
_EN_FAMILY = ["Tal", "Vantrell", "Oakhart", "Greyhame", "Mirecourt", "Ashdown", "Coldrake", "Fairweather",
              "Hollowell", "Kestrane", "Larkspire", "Merrow", "Nightsedge", "Penhallow", "Quarrington",
              "Redfern", "Stormholt", "Thornbury", "Underhay", "Wolstan", "Brackwater", "Dunmere"]
_EN_JOBS = ["shipwright", "shepherd", "stonemason", "fisherwoman", "glassblower", "cartographer",
            "beekeeper", "salt merchant", "ferryman", "herbalist"]
_EN_RIVER = ["Sel", "Amberrun", "Quillwater", "Dree", "Morrow", "Tessing", "Lune", "Corrant", "Hask",
             "Wyre", "Ebbing", "Pellow", "Sarn", "Otterlee", "Glim", "Rusk", "Vey", "Brannock", "Ister",
             "Calder", "Nith", "Wend", "Frome", "Ashbourne"]
_EN_GOODS_A = ["smoked", "blue", "copper", "salted", "spiced", "lacquered", "woven", "pickled", "carved",
               "painted", "gilded", "dried"]
_EN_GOODS_B = ["eel", "glass beads", "kettles", "herring", "plum wine", "boxes", "reed mats", "quinces",
               "whalebone combs", "kites", "mirrors", "figs"]
_EN_FEAST = ["Lantern Tide", "Ember Vigil", "Feast of Nets", "Hollow Moon Fair", "Gull Race",
             "Night of Bells", "Thaw Parade", "Reaping Dance", "Kite Morning", "Salt Supper",
             "Ashen Walk", "Festival of Lamps", "Tidewatch", "Mummers' Eve", "Barley Crown",
             "Heron Games", "Candle Regatta", "Frost Market", "Wren Sunday", "Founders' Bonfire"]
_EN_BEAST_A = ["silver", "crimson", "two-headed", "golden", "black", "winged", "sleeping", "crowned",
               "one-eyed", "white"]
_EN_BEAST_B = ["heron", "stag", "otter", "wolf", "salmon", "hare", "boar", "owl", "lynx", "crab"]
_EN_TITLE = ["Keeper of the Tides", "Warden of the Eastern Marsh", "Master of Bridges",
             "Chancellor of Salt", "High Archivist", "Lady of the Lamps", "Steward of Orchards",
             "Captain of the Harbour Watch", "First Cartographer", "Guardian of the Seed Vault",
             "Reeve of the Northern Downs", "Mistress of Coin", "Provost of the Glass Guild",
             "Lord of the Ferries", "Marshal of the Reach", "Curator of Bells",
             "Overseer of Dykes", "Herald of the Fair", "Admiral of the Reed Fleet", "Clerk of Storms"]
_EN_BOOK_A = ["Ledger", "Song", "Atlas", "Lament", "Almanac", "Treatise", "Chronicle", "Primer",
              "Herbal", "Map"]
_EN_BOOK_B = ["Salt", "Low Tides", "Quiet Rivers", "Burning Reeds", "the Lost Fleet", "Grey Orchards",
              "Seven Bridges", "Winter Bees", "Glass Towers", "the Drowned Bell"]
_EN_PET = ["Pip", "Marrow", "Juniper", "Cinder", "Bartholomew", "Sprout", "Nettle", "Whisk", "Bramble",
           "Thimble", "Pumice", "Sorrel", "Tansy", "Clover", "Button", "Quince", "Moth", "Rook",
           "Wicket", "Fennel"]

_ZH_PREFIX = list("青白赤云雾石松枫柳金银玉霜星月澜岚潮砂苍")
_ZH_SUFFIX = list("港镇城堡关渡")
_ZH_SURNAME = list("林苏顾沈陆叶秦温谢韩姜许宋罗唐萧")
_ZH_GIVEN = list("墨晴川远舟岳澄宁珂知衡舒朗岑修恒")
_ZH_JOBS = ["渔夫", "石匠", "织工", "药师", "船匠", "盐商", "陶工", "猎户", "画师", "铁匠"]
_ZH_RIVER_A = list("碧清澄寒白赤黛沧翠曲玄丹")
_ZH_RIVER_B = ["水河", "沙江", "石溪", "云河", "烟江", "泉溪"]
_ZH_GOODS_A = ["琥珀", "青瓷", "紫檀", "雪梨", "银鱼", "云锦", "松烟", "桂花", "竹编", "海盐", "蜜饯", "蓝染"]
_ZH_GOODS_B = ["茶", "酒", "纸", "布", "灯", "糕", "扇", "伞", "墨", "香"]
_ZH_FEAST = ["灯笼节", "潮汐节", "星火节", "花信节", "归帆节", "丰谷节", "雾散节", "雪祭节", "纸鸢节",
             "鼓乐节", "船灯节", "晒秋节", "采莲节", "迎潮节", "石榴节", "醉月节", "听雨节", "走桥节",
             "放鹤节", "烧竹节"]
_ZH_COLOR = ["银色", "赤色", "金色", "墨色", "青色", "白色", "紫色", "双头", "独角", "三足"]
_ZH_BEAST = ["白鹭", "麋鹿", "水獭", "苍狼", "鲤鱼", "野兔", "黑熊", "猫头鹰", "仙鹤", "螃蟹"]

UNANSWERABLE = [
    "What is the capital of France?",
    "How many moons does Jupiter have?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water at sea level?",
    "How do I reset my router password?",
    "Which programming language was created by Guido van Rossum?",
    "What is the recommended dose of ibuprofen for adults?",
    "Who won the football world cup in 2014?",
    "How tall is Mount Everest?",
    "What is the speed of light in a vacuum?",
    "法国的首都是哪座城市？",
    "木星有多少颗卫星？",
    "蒙娜丽莎是谁画的？",
    "水在海平面的沸点是多少度？",
    "怎样重置路由器的密码？",
    "Python语言是谁发明的？",
    "成年人服用布洛芬的推荐剂量是多少？",
    "2014年世界杯冠军是哪个国家？",
    "珠穆朗玛峰有多高？",
    "光在真空中的速度是多少？",
]


def _unique(rng: random.Random, make, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = make()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _english_towns(rng: random.Random, taken: set[str], years: list[int], count: int):
    names = _unique(rng, lambda: rng.choice(_EN_PREFIX) + rng.choice(_EN_SUFFIX), count, taken)
    founders = _unique(rng, lambda: f"{rng.choice(_EN_GIVEN)} {rng.choice(_EN_FAMILY)}", count, taken)
    rivers = rng.sample(_EN_RIVER, count)
    goods = _unique(rng, lambda: f"{rng.choice(_EN_GOODS_A)} {rng.choice(_EN_GOODS_B)}", count, taken)
    feasts = rng.sample(_EN_FEAST, count)
    beasts = _unique(rng, lambda: f"{rng.choice(_EN_BEAST_A)} {rng.choice(_EN_BEAST_B)}", count, taken)
    towns = []
    for i, name in enumerate(names):
        job, year = rng.choice(_EN_JOBS), years.pop()
        facts = [
            ("founder", f"{name} was founded by {founders[i]}, a {job}, in the year {year}.",
             f"Who established the settlement of {name}?", founders[i]),
            ("year", None, f"When did {name} come into existence?", str(year)),
            ("river", f"The town stands on the banks of the {rivers[i]}, which floods every spring.",
             f"Which waterway runs past {name}?", rivers[i]),
            ("export", f"Merchants of {name} grew rich trading {goods[i]} along the coast.",
             f"What product is {name} best known for selling?", goods[i]),
            ("festival", f"Each autumn its people celebrate the {feasts[i]} with music in the square.",
             f"Which yearly celebration is held in {name}?", feasts[i]),
            ("emblem", f"The banner of {name} shows a {beasts[i]} on a green field.",
             f"What creature appears on {name}'s flag?", beasts[i]),
        ]
        filler = rng.choice([f"Travellers say the streets of {name} are the narrowest in the Reach.",
                             "Its old walls were rebuilt twice after the great storms.",
                             f"The market square of {name} is paved with river stones."])
        towns.append((name, facts, filler))
    return towns


def _english_people(rng: random.Random, taken: set[str], years: list[int], towns: list[str], count: int):
    people = _unique(rng, lambda: f"{rng.choice(_EN_GIVEN)} {rng.choice(_EN_FAMILY)}", count, taken)
    titles = rng.sample(_EN_TITLE, count)
    books = _unique(rng, lambda: f"The {rng.choice(_EN_BOOK_A)} of {rng.choice(_EN_BOOK_B)}", count, taken)
    pets = rng.sample(_EN_PET, count)
    out = []
    for i, person in enumerate(people):
        year, town = years.pop(), rng.choice(towns)
        first = person.split()[0]
        facts = [
            ("born", f"{person} was born in {town} in {year} and grew up near the docks.",
             f"In what year did {person} come into the world?", str(year)),
            ("title", f"At forty, {first} was named {titles[i]} by the council of the Reach.",
             f"What office did {person} hold?", titles[i]),
            ("book", f"{person} wrote {books[i]}, still read in every school.",
             f"Which work did {person} author?", books[i]),
            ("pet", f"{first} never travelled without a tame jackdaw called {pets[i]}.",
             f"What was the name of {person}'s bird?", pets[i]),
        ]
        out.append((person, facts))
    return out


def _chinese_towns(rng: random.Random, taken: set[str], years: list[int], count: int):
    names = _unique(rng, lambda: "".join(rng.sample(_ZH_PREFIX, 2)) + rng.choice(_ZH_SUFFIX), count, taken)
    founders = _unique(rng, lambda: rng.choice(_ZH_SURNAME) + rng.choice(_ZH_GIVEN), count, taken)
    rivers = _unique(rng, lambda: rng.choice(_ZH_RIVER_A) + rng.choice(_ZH_RIVER_B), count, taken)
    goods = _unique(rng, lambda: rng.choice(_ZH_GOODS_A) + rng.choice(_ZH_GOODS_B), count, taken)
    feasts = rng.sample(_ZH_FEAST, count)
    beasts = _unique(rng, lambda: rng.choice(_ZH_COLOR) + rng.choice(_ZH_BEAST), count, taken)
    towns = []
    for i, name in enumerate(names):
        job, year = rng.choice(_ZH_JOBS), years.pop()
        facts = [
            ("founder", f"{name}由{job}{founders[i]}于公元{year}年创建。",
             f"是谁建立了{name}？", founders[i]),
            ("year", None, f"{name}始建于哪一年？", str(year)),
            ("river", f"{name}坐落在{rivers[i]}畔，每逢春天河水都会上涨。",
             f"流经{name}的是哪条河？", rivers[i]),
            ("export", f"{name}的{goods[i]}远近闻名，商人把它运往沿海各地。",
             f"{name}最有名的特产是什么？", goods[i]),
            ("festival", f"每年秋天，当地居民都会在广场上奏乐，庆祝{feasts[i]}。",
             f"{name}人每年过什么节日？", feasts[i]),
            ("emblem", f"{name}的城旗上绘着一只{beasts[i]}。",
             f"{name}的徽章图案是什么动物？", beasts[i]),
        ]
        filler = rng.choice([f"来往的旅人都说{name}的街巷是澜州最窄的。",
                             "城墙在两次大风暴之后都重新修筑过。",
                             f"{name}的集市广场用河石铺成。"])
        towns.append((name, facts, filler))
    return towns


def _paragraph(facts, filler: str, joiner: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """The paragraph's text and its facts as (relation, sentence, question, answer)."""
    sentences, stated = [], []
    for relation, sentence, question, answer in facts:
        if sentence is not None:
            sentences.append(sentence)
        stated.append((relation, sentence or sentences[-1], question, answer))
    if filler:
        sentences.insert(3, filler)
    return joiner.join(sentences), stated


def world(seed: int = 0, towns_per_language: int = 20, people: int = 20) -> tuple[dict[str, str], list[Fact]]:
    """The documents (file name -> text) and the facts they state (at least 200 with the defaults)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    years = rng.sample(range(300, 1000), towns_per_language * 2 + people)
    documents: dict[str, str] = {}
    facts: list[Fact] = []

    def add(file: str, title: str, paragraphs, language: str, joiner: str) -> None:
        texts = [title]
        for subject, items, filler in paragraphs:
            text, stated = _paragraph(items, filler, joiner)
            texts.append(text)
            facts.extend(Fact(q, a, s, file, language, subject, r) for r, s, q, a in stated)
        documents[file] = "\n\n".join(texts) + "\n"

    en_towns = _english_towns(rng, taken, years, towns_per_language)
    half = len(en_towns) // 2
    add("reach_gazetteer_north.md", "# Gazetteer of the Orvane Reach: the northern towns",
        en_towns[:half], "en", " ")
    add("reach_gazetteer_south.txt", "Gazetteer of the Orvane Reach: the southern towns",
        en_towns[half:], "en", " ")
    people_list = _english_people(rng, taken, years, [t[0] for t in en_towns], people)
    add("reach_biographies.md", "# Notable people of the Orvane Reach",
        [(p, items, "") for p, items in people_list], "en", " ")
    zh_towns = _chinese_towns(rng, taken, years, towns_per_language)
    half = len(zh_towns) // 2
    add("lanzhou_east.md", "# 澜州风物志：东部诸城", zh_towns[:half], "zh", "")
    add("lanzhou_west.txt", "澜州风物志：西部诸城", zh_towns[half:], "zh", "")
    _check(documents, facts)
    return documents, facts


def _check(documents: dict[str, str], facts: list[Fact]) -> None:
    corpus = "\n".join(documents.values())
    for fact in facts:
        if corpus.count(fact.answer) != 1 or fact.answer not in documents[fact.file]:
            raise AssertionError(f"fiction: answer {fact.answer!r} occurs {corpus.count(fact.answer)} times")


def write_world(folder: str | Path, seed: int = 0) -> list[Fact]:
    """Write the world's documents into ``folder``; its facts."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    documents, facts = world(seed)
    for name, text in documents.items():
        (root / name).write_text(text, encoding="utf-8")
    return facts
