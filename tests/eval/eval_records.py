"""Task records shared by the eval tests."""

import json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


MC_RECORDS = [
    {"prompt": "The cat sat on the", "choices": ["mat", "log", "tree", "capital"], "answer": 0},
    {"prompt": "Paris is the capital of", "choices": ["Italy", "France", "Germany"], "answer": 1},
    {"prompt": "Two plus two is", "choices": ["six", "two", "four"], "answer": 2},
    {"prompt": "Question: what colour is the sky? Answer:", "choices": ["green", "blue"], "answer": 1},
    {"prompt": "A bird sang in the", "choices": ["tree", "mat"], "answer": 0},
    {"prompt": "Rome is the capital of", "choices": ["France", "Italy"], "answer": 1},
    {"prompt": "The dog sat on the", "choices": ["log", "sky", "cafe"], "answer": 0},
    {"prompt": "One plus one is", "choices": ["four", "two"], "answer": 1},
    {"prompt": "Berlin is in", "choices": ["Germany", "France", "the tree"], "answer": 0},
    {"prompt": "Three plus three is", "choices": ["two", "six"], "answer": 1},
]
