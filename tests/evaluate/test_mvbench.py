"""``evaluate/mvbench.py``'s task table: the JSON file names of the original's ``data_list``
(``ppllava/test/mvbench/utils.py``), derived here from the task names. The prompts, frames and
scoring against the original's outputs: protocol/mvbench_cases.py."""

from ppllava_jax.evaluate import mvbench

# the original's data_list: task -> json file, as written there
ORIGINAL_FILES = {
    "Action Sequence": "action_sequence.json",
    "Action Prediction": "action_prediction.json",
    "Action Antonym": "action_antonym.json",
    "Fine-grained Action": "fine_grained_action.json",
    "Unexpected Action": "unexpected_action.json",
    "Object Existence": "object_existence.json",
    "Object Interaction": "object_interaction.json",
    "Object Shuffle": "object_shuffle.json",
    "Moving Direction": "moving_direction.json",
    "Action Localization": "action_localization.json",
    "Scene Transition": "scene_transition.json",
    "Action Count": "action_count.json",
    "Moving Count": "moving_count.json",
    "Moving Attribute": "moving_attribute.json",
    "State Change": "state_change.json",
    "Fine-grained Pose": "fine_grained_pose.json",
    "Character Order": "character_order.json",
    "Egocentric Navigation": "egocentric_navigation.json",
    "Episodic Reasoning": "episodic_reasoning.json",
    "Counterfactual Inference": "counterfactual_inference.json",
}


def test_task_files_are_the_originals():
    assert {t: row[0] for t, row in mvbench.TASKS.items()} == ORIGINAL_FILES
    assert list(mvbench.TASKS) == list(ORIGINAL_FILES)  # the table's order, as the original's


def test_only_frame_folders_and_bounded_tasks_are_flagged():
    kinds = {t: row[2] for t, row in mvbench.TASKS.items()}
    assert [t for t, k in kinds.items() if k == "frame"] == ["Episodic Reasoning"]
    bounded = [t for t, row in mvbench.TASKS.items() if row[3]]
    assert bounded == [
        "Action Sequence",
        "Action Prediction",
        "Object Interaction",
        "Action Localization",
        "Episodic Reasoning",
    ]
