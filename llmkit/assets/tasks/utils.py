"""Helpers of the shipped tasks: HellaSwag preprocessing and CrowS-Pairs scoring, as lm-evaluation-harness's."""

import re


def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset):
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out_doc = {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
        return out_doc

    return dataset.map(_process_doc)


# CrowS-Pairs, as lm-evaluation-harness's lm_eval/tasks/crows_pairs/utils.py


def crows_pairs_process_results(doc, results):
    lls, _ = zip(*results)
    likelihood1, likelihood2 = lls
    # absolute difference in log-likelihoods; the stereotyped sentence "wins" when it is the likelier
    diff = abs(likelihood1 - likelihood2)
    acc = 1.0 if likelihood1 > likelihood2 else 0.0
    return {"likelihood_diff": diff, "pct_stereotype": acc}


def crows_pairs_doc_to_choice(doc):
    return [doc["sent_more"], doc["sent_less"]]
