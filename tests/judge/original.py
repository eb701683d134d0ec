"""The original's judge, transcribed for the tests (never imported from the project): the
prompts of its scripts (``ppllava/test/gpt_evaluation/*.py``, the string pieces copied line for
line, each block citing file:lines), the result names it gives and the summary loops it runs
at the end of each script, printing what it prints."""

from __future__ import annotations

import io


def original_prompts(
    question="", answer="", pred="", question1="", question2="", pred1="", pred2=""
) -> dict[str, tuple[str, str]]:
    """{criterion: (system, user)} as the original's scripts build them (their string pieces
    copied line for line; the user messages are their f-strings)."""
    return {
        "qa": (
            # evaluate_activitynet_qa.py:39-45 (system), :50-57 (user)
            (
                "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "  # noqa: E501
                "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Focus on the meaningful match between the predicted answer and the correct answer.\n"  # noqa: E501
                "- Consider synonyms or paraphrases as valid matches.\n"
                "- Evaluate the correctness of the prediction compared to the answer."
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
            ),
        ),
        "correctness": (
            # evaluate_benchmark_1_correctness.py:39-46 (system), :51-59 (user)
            (
                "You are an intelligent chatbot designed for evaluating the factual accuracy of generative outputs for video-based question-answer pairs. "  # noqa: E501
                "Your task is to compare the predicted answer with the correct answer and determine if they are factually consistent. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Focus on the factual consistency between the predicted answer and the correct answer. The predicted answer should not contain any misinterpretations or misinformation.\n"  # noqa: E501
                "- The predicted answer must be factually accurate and align with the video content.\n"  # noqa: E501
                "- Consider synonyms or paraphrases as valid matches.\n"
                "- Evaluate the factual accuracy of the prediction compared to the answer."
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a factual accuracy score where the factual accuracy score is an integer value between 0 and 5, with 5 indicating the highest level of factual consistency. "  # noqa: E501
                "Please assign a score of 0 when the meaning of Predicted Answer is similar to 'I don't know'."  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the factual accuracy score in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {''score': 4.8}."
            ),
        ),
        "detail": (
            # evaluate_benchmark_2_detailed_orientation.py:39-46 (system), :51-58 (user)
            (
                "You are an intelligent chatbot designed for evaluating the detail orientation of generative outputs for video-based question-answer pairs. "  # noqa: E501
                "Your task is to compare the predicted answer with the correct answer and determine its level of detail, considering both completeness and specificity. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Check if the predicted answer covers all major points from the video. The response should not leave out any key aspects.\n"  # noqa: E501
                "- Evaluate whether the predicted answer includes specific details rather than just generic points. It should provide comprehensive information that is tied to specific elements of the video.\n"  # noqa: E501
                "- Consider synonyms or paraphrases as valid matches.\n"
                "- Provide a single evaluation score that reflects the level of detail orientation of the prediction, considering both completeness and specificity."  # noqa: E501
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a detail orientation score where the detail orientation score is an integer value between 0 and 5, with 5 indicating the highest level of detail orientation. "  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the detail orientation score in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {''score': 4.8}."
            ),
        ),
        "context": (
            # evaluate_benchmark_3_context.py:39-46 (system), :51-58 (user)
            (
                "You are an intelligent chatbot designed for evaluating the contextual understanding of generative outputs for video-based question-answer pairs. "  # noqa: E501
                "Your task is to compare the predicted answer with the correct answer and determine if the generated response aligns with the overall context of the video content. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Evaluate whether the predicted answer aligns with the overall context of the video content. It should not provide information that is out of context or misaligned.\n"  # noqa: E501
                "- The predicted answer must capture the main themes and sentiments of the video.\n"
                "- Consider synonyms or paraphrases as valid matches.\n"
                "- Provide your evaluation of the contextual understanding of the prediction compared to the answer."  # noqa: E501
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a contextual understanding score where the contextual understanding score is an integer value between 0 and 5, with 5 indicating the highest level of contextual understanding. "  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is contextual understanding score in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {''score': 4.8}."
            ),
        ),
        "temporal": (
            # evaluate_benchmark_4_temporal.py:40-46 (system), :51-58 (user)
            (
                "You are an intelligent chatbot designed for evaluating the temporal understanding of generative outputs for video-based question-answer pairs. "  # noqa: E501
                "Your task is to compare the predicted answer with the correct answer and determine if they correctly reflect the temporal sequence of events in the video content. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Focus on the temporal consistency between the predicted answer and the correct answer. The predicted answer should correctly reflect the sequence of events or details as they are presented in the video content.\n"  # noqa: E501
                "- Consider synonyms or paraphrases as valid matches, but only if the temporal order is maintained.\n"  # noqa: E501
                "- Evaluate the temporal accuracy of the prediction compared to the answer."
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a temporal accuracy score where the temporal accuracy score is an integer value between 0 and 5, with 5 indicating the highest level of temporal consistency. "  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the temporal accuracy score in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {''score': 4.8}."
            ),
        ),
        "consistency": (
            # evaluate_benchmark_5_consistency.py:41-49 (system), :54-63 (user)
            (
                "You are an intelligent chatbot designed for evaluating the consistency of generative outputs for similar video-based question-answer pairs. "  # noqa: E501
                "You will be given two very similar questions, a common answer common to both the questions and predicted answers for the two questions ."  # noqa: E501
                "Your task is to compare the predicted answers for two very similar question, with a common correct answer and determine if they are consistent. Here's how you can accomplish the task:"  # noqa: E501
                "------"
                "##INSTRUCTIONS: "
                "- Focus on the consistency between the two predicted answers and the correct answer. Both predicted answers should correspond to the correct answer and to each other, and should not contain any contradictions or significant differences in the conveyed information.\n"  # noqa: E501
                "- Both predicted answers must be consistent with each other and the correct answer, in terms of the information they provide about the video content.\n"  # noqa: E501
                "- Consider synonyms or paraphrases as valid matches, but only if they maintain the consistency in the conveyed information.\n"  # noqa: E501
                "- Evaluate the consistency of the two predicted answers compared to the correct answer."  # noqa: E501
            ),
            (
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question 1: {question1}\n"
                f"Question 2: {question2}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer to Question 1: {pred1}\n"
                f"Predicted Answer to Question 2: {pred2}\n\n"
                "Provide your evaluation only as a consistency score where the consistency score is an integer value between 0 and 5, with 5 indicating the highest level of consistency. "  # noqa: E501
                "Please generate the response in the form of a Python dictionary string with keys 'score', where its value is the consistency score in INTEGER, not STRING."  # noqa: E501
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "  # noqa: E501
                "For example, your response should look like this: {''score': 4.8}."
            ),
        ),
    }


def print_lines(*calls: tuple) -> list[str]:
    """The lines ``print(*args)`` writes for each call."""
    buf = io.StringIO()
    for args in calls:
        print(*args, file=buf)
    return buf.getvalue().splitlines()


def original_keys(pred_contents: list[dict], field: str) -> list[str]:
    """The result names the original gives (evaluate_activitynet_qa.py:85-99, ``id``;
    evaluate_benchmark_*.py ``video_name``)."""
    video_id_counts: dict = {}
    keys = []
    for sample in pred_contents:
        video_id = sample[field]
        if video_id in video_id_counts:
            video_id_counts[video_id] += 1
        else:
            video_id_counts[video_id] = 0
        keys.append(f"{video_id}_{video_id_counts[video_id]}")
    return keys


def original_qa_summary(combined_contents: dict) -> list[str]:
    """evaluate_activitynet_qa.py:171-201."""
    score_sum = 0
    count = 0
    yes_count = 0
    no_count = 0
    for _key, result in combined_contents.items():
        count += 1
        if isinstance(result[0], list):
            result = result[0]
        try:
            score_match = result[0]["score"]
        except Exception:  # noqa: BLE001 - the original's bare except
            score_match = 3
        score = int(score_match)
        score_sum += score
        pred = result[0]["pred"]
        if "yes" in pred.lower():
            yes_count += 1
        elif "no" in pred.lower():
            no_count += 1
    average_score = score_sum / count
    accuracy = yes_count / (yes_count + no_count)
    return print_lines(
        ("Yes count:", yes_count),
        ("No count:", no_count),
        ("Accuracy:", accuracy),
        ("Average score:", average_score),
    )


def original_vcg_summary(criterion: str, combined_contents: dict) -> list[str]:
    """evaluate_benchmark_1_correctness.py:173-186 (2_detailed_orientation.py:173-186 the same),
    3_context.py:177-187, 4_temporal.py:172-182, 5_consistency.py:179-192."""
    score_sum = 0
    count = 0
    for _key, result in combined_contents.items():
        count += 1
        if criterion in ("correctness", "detail"):
            try:
                score_match = result[0]["score"]
            except Exception:  # noqa: BLE001
                continue
        else:  # context, temporal: no try; consistency: its except only passes
            score_match = result[0]["score"]
        score = int(score_match)
        score_sum += score
    average_score = score_sum / count
    label = {
        "correctness": "Average score for correctness:",
        "detail": "Average score for detailed orientation:",
        "context": "Average score for contextual understanding:",
        "temporal": "Average score temporal understanding:",
        "consistency": "Average score for consistency:",
    }[criterion]
    return print_lines((label, average_score))
