"""The plugin's own test: the formulation conformance kit on every built-in backbone of robovlms."""

from robovlms.testing import assert_formulation_conforms


def test_gru_head_conforms_on_every_built_in_backbone():
    assert_formulation_conforms("gru-head", gru_width=32)


def test_gru_head_conforms_with_a_generative_action_objective():
    assert_formulation_conforms("gru-head", backbones=["gpt-scratch"], objective="flow-matching")
