"""Shared text for the vocabulary tests: Chinese documents generated deterministically from a
small word list (so words recur, as in a real corpus, and no data file is needed), and English
sentences that must encode exactly as before an extension."""

from __future__ import annotations

import random

import pytest

ZH_WORDS = [
    "我们", "你们", "他们", "今天", "明天", "天气", "很好", "学习", "工作", "数据", "模型", "语言",
    "训练", "中文", "文本", "问题", "回答", "可以", "需要", "使用", "提供", "帮助", "信息", "技术",
    "计算机", "人工智能", "自然语言", "处理", "研究", "发展", "中国", "北京", "上海", "城市", "公园",
    "散步", "健康", "饮食", "锻炼", "睡眠", "红色", "蓝色", "黄色", "三个", "一个", "重要", "简单",
    "方法", "结果", "分析", "生活", "朋友", "老师", "学生", "学校", "图书馆", "时间", "经济", "社会",
    "的", "了", "和", "是", "在", "有", "也", "都", "很", "就",
]

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy: eat well, exercise, and sleep.",
    "What are the three primary colors? Red, blue, and yellow.",
    "A language model predicts the next token from the ones before it.",
    "Instruction: summarise the text below in one sentence.\nResponse: done.",
    "Numbers 12345 and symbols #$%&*()[]{} stay as they were.",
    "  leading spaces, trailing spaces  ",
]


def chinese_texts(count: int, seed: int) -> list[str]:
    """``count`` Chinese documents of a few sentences each (a digit or Latin word now and then)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(ZH_WORDS) for _ in range(rng.randint(4, 12))]
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), rng.choice(["AI", "2024", "GPU", "3"]))
            middle = rng.randrange(1, len(words))
            sentences.append("".join(words[:middle]) + rng.choice(["，", "、", "："])
                             + "".join(words[middle:]) + rng.choice(["。", "！", "？"]))
        texts.append("".join(sentences))
    return texts


@pytest.fixture(scope="session")
def zh_train() -> list[str]:
    """200 Chinese documents to learn from."""
    return chinese_texts(200, seed=1)


@pytest.fixture(scope="session")
def zh_held() -> list[str]:
    """20 other Chinese documents (another seed) to measure on."""
    return chinese_texts(20, seed=2)


@pytest.fixture(scope="session")
def english() -> list[str]:
    return list(ENGLISH)
