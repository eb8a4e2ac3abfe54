"""The cases whose ftkit rows differ from Axolotl's on purpose, with the DIFFERENCES.md entry that says why.
(D1, rows that train nothing, is applied to every case by the comparison itself.)"""
DELIBERATE: dict[str, str] = {
    "ct_roles_replace_default": "D2 (a role that roles: does not map is an error, not rendered as it is)",
    "alpaca_missing_field": "D3 (a bad row is dropped and reported; Axolotl stops the whole run)",
    "ct_empty_last_turn_eos": "D4 (an empty turn trains nothing, not even the conversation's last token)",
}
