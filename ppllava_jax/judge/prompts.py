"""The judge prompts of the original (``ppllava/test/gpt_evaluation/*.py``, Video-ChatGPT's
scripts), character for character, one :class:`Criterion` per script.

Each request is two messages, ``system`` then ``user``; the user message is the pair
(question, correct answer, prediction; consistency: both questions and both predictions) between
a fixed head and the criterion's instruction. The texts keep the original's oddities (the
missing spaces where its string pieces join, ``is  a``, ``{''score': 4.8}``): a judge model
scores what it is shown, so a cleaned-up prompt would give other numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEAD = "Please evaluate the following video-based question-answer pair:\n\n"
ROLE = "You are an intelligent chatbot designed for evaluating the "
HOW = " Here's how you can accomplish the task:------##INSTRUCTIONS: "
DICT_ONLY = (
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary "
    "string. For example, your response should look like this: "
)
SCORE_EXAMPLE = "{''score': 4.8}."


def _score_instruction(what: str, top: str, extra: str = "", its: str = "its value is the ") -> str:
    """The user message's tail of the five score-only scripts."""
    return (
        f"Provide your evaluation only as a {what} score where the {what} score is an integer "
        f"value between 0 and 5, with 5 indicating the highest {top}. {extra}Please generate the "
        f"response in the form of a Python dictionary string with keys 'score', where {its}"
        f"{what} score in INTEGER, not STRING." + DICT_ONLY + SCORE_EXAMPLE
    )


@dataclass(frozen=True)
class Criterion:
    """One judge script of the original.

    name: the flag value (``qa``, ``correctness``, ``detail``, ``context``, ``temporal``,
    ``consistency``); script: the original's file; layout: the judge-input records it reads
    (``qa``: ``{pred, answer, question, id}``, ``vcg``: ``{pred, A, Q, video_name}``,
    ``consistency``: ``{pred1, pred2, video_name, A, Q1, Q2}``); system / instruction: the
    fixed texts; label: the start of the line the script prints with the average score.
    """

    name: str
    script: str
    layout: str
    system: str
    instruction: str
    label: str

    def messages(self, qa_set: Mapping[str, Any]) -> list[dict[str, str]]:
        """The chat messages for one ``qa_set`` (``{q, a, pred}``; consistency: ``{q1, q2, a,
        pred1, pred2}``), values formatted as the original's f-strings format them."""
        if self.layout == "consistency":
            pair = (
                f"Question 1: {qa_set['q1']}\n"
                f"Question 2: {qa_set['q2']}\n"
                f"Correct Answer: {qa_set['a']}\n"
                f"Predicted Answer to Question 1: {qa_set['pred1']}\n"
                f"Predicted Answer to Question 2: {qa_set['pred2']}\n\n"
            )
        else:
            pair = (
                f"Question: {qa_set['q']}\n"
                f"Correct Answer: {qa_set['a']}\n"
                f"Predicted Answer: {qa_set['pred']}\n\n"
            )
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": HEAD + pair + self.instruction},
        ]


QA = Criterion(
    name="qa",
    script="evaluate_activitynet_qa.py",
    layout="qa",
    system=(
        ROLE + "correctness of generative outputs for question-answer pairs. Your task is to "
        "compare the predicted answer with the correct answer and determine if they match "
        "meaningfully." + HOW + "- Focus on the meaningful match between the predicted answer "
        "and the correct answer.\n- Consider synonyms or paraphrases as valid matches.\n"
        "- Evaluate the correctness of the prediction compared to the answer."
    ),
    instruction=(
        "Provide your evaluation only as a yes/no and score where the score is an integer value "
        "between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
        "response in the form of a Python dictionary string with keys 'pred' and 'score', where "
        "value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not "
        "STRING." + DICT_ONLY + "{'pred': 'yes', 'score': 4.8}."
    ),
    label="Average score:",
)

CORRECTNESS = Criterion(
    name="correctness",
    script="evaluate_benchmark_1_correctness.py",
    layout="vcg",
    system=(
        ROLE + "factual accuracy of generative outputs for video-based question-answer pairs. "
        "Your task is to compare the predicted answer with the correct answer and determine if "
        "they are factually consistent." + HOW + "- Focus on the factual consistency between "
        "the predicted answer and the correct answer. The predicted answer should not contain "
        "any misinterpretations or misinformation.\n- The predicted answer must be factually "
        "accurate and align with the video content.\n- Consider synonyms or paraphrases as "
        "valid matches.\n- Evaluate the factual accuracy of the prediction compared to the "
        "answer."
    ),
    instruction=_score_instruction(
        "factual accuracy",
        "level of factual consistency",
        "Please assign a score of 0 when the meaning of Predicted Answer is similar to "
        "'I don't know'.",
    ),
    label="Average score for correctness:",
)

DETAIL = Criterion(
    name="detail",
    script="evaluate_benchmark_2_detailed_orientation.py",
    layout="vcg",
    system=(
        ROLE + "detail orientation of generative outputs for video-based question-answer "
        "pairs. Your task is to compare the predicted answer with the correct answer and "
        "determine its level of detail, considering both completeness and specificity."
        + HOW
        + "- Check if the predicted answer covers all major points from the video. The "
        "response should not leave out any key aspects.\n- Evaluate whether the predicted "
        "answer includes specific details rather than just generic points. It should provide "
        "comprehensive information that is tied to specific elements of the video.\n- Consider "
        "synonyms or paraphrases as valid matches.\n- Provide a single evaluation score that "
        "reflects the level of detail orientation of the prediction, considering both "
        "completeness and specificity."
    ),
    instruction=_score_instruction("detail orientation", "level of detail orientation"),
    label="Average score for detailed orientation:",
)

CONTEXT = Criterion(
    name="context",
    script="evaluate_benchmark_3_context.py",
    layout="vcg",
    system=(
        ROLE + "contextual understanding of generative outputs for video-based question-answer "
        "pairs. Your task is to compare the predicted answer with the correct answer and "
        "determine if the generated response aligns with the overall context of the video "
        "content." + HOW + "- Evaluate whether the predicted answer aligns with the overall "
        "context of the video content. It should not provide information that is out of "
        "context or misaligned.\n- The predicted answer must capture the main themes and "
        "sentiments of the video.\n- Consider synonyms or paraphrases as valid matches.\n"
        "- Provide your evaluation of the contextual understanding of the prediction compared "
        "to the answer."
    ),
    instruction=_score_instruction(
        "contextual understanding", "level of contextual understanding", its="its value is "
    ),
    label="Average score for contextual understanding:",
)

TEMPORAL = Criterion(
    name="temporal",
    script="evaluate_benchmark_4_temporal.py",
    layout="vcg",
    system=(
        ROLE + "temporal understanding of generative outputs for video-based question-answer "
        "pairs. Your task is to compare the predicted answer with the correct answer and "
        "determine if they correctly reflect the temporal sequence of events in the video "
        "content." + HOW + "- Focus on the temporal consistency between the predicted answer "
        "and the correct answer. The predicted answer should correctly reflect the sequence of "
        "events or details as they are presented in the video content.\n- Consider synonyms or "
        "paraphrases as valid matches, but only if the temporal order is maintained.\n"
        "- Evaluate the temporal accuracy of the prediction compared to the answer."
    ),
    instruction=_score_instruction("temporal accuracy", "level of temporal consistency"),
    label="Average score temporal understanding:",
)

CONSISTENCY = Criterion(
    name="consistency",
    script="evaluate_benchmark_5_consistency.py",
    layout="consistency",
    system=(
        ROLE + "consistency of generative outputs for similar video-based question-answer "
        "pairs. You will be given two very similar questions, a common answer common to both "
        "the questions and predicted answers for the two questions .Your task is to compare "
        "the predicted answers for two very similar question, with a common correct answer and "
        "determine if they are consistent." + HOW + "- Focus on the consistency between the "
        "two predicted answers and the correct answer. Both predicted answers should correspond "
        "to the correct answer and to each other, and should not contain any contradictions or "
        "significant differences in the conveyed information.\n- Both predicted answers must be "
        "consistent with each other and the correct answer, in terms of the information they "
        "provide about the video content.\n- Consider synonyms or paraphrases as valid matches, "
        "but only if they maintain the consistency in the conveyed information.\n- Evaluate the "
        "consistency of the two predicted answers compared to the correct answer."
    ),
    instruction=_score_instruction("consistency", "level of consistency"),
    label="Average score for consistency:",
)

CRITERIA: dict[str, Criterion] = {
    c.name: c for c in (QA, CORRECTNESS, DETAIL, CONTEXT, TEMPORAL, CONSISTENCY)
}
VCG_CRITERIA = ("correctness", "detail", "context", "temporal", "consistency")
