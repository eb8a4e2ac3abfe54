"""The cases whose ftkit rows differ from Axolotl's on purpose, with the DIFFERENCES.md entry that says why.
(D1, rows that train nothing, is applied to every case by the comparison itself.)"""
DELIBERATE: dict[str, str] = {
    "ct_roles_replace_default": "D2 (a role that roles: does not map is an error, not rendered as it is)",
    "alpaca_missing_field": "D3 (a bad row is dropped and reported; Axolotl stops the whole run)",
    "ct_empty_first_turn_eos": "D4 (an empty turn trains nothing, not even an end-of-turn token near the start)",
    "ct_field_system": "D5 (field_system is honoured)",
    "sharegpt_type": "D7 (type: sharegpt still works, as a chat_template preset)",
    "ct_thinking_keys": "D8 (field_thinking is honoured)",
    "ct_default_system_message": "D9 (default_system_message adds a system turn)",
    "ct_tpl_gemma_system": "D6 (gemma folds a system turn into the first user turn)",
}
