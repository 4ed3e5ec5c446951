"""Know what you made: evaluation of models on text (bits/token, KL from the merge, greedy answers), a
pre-merge report from the weights alone, and a budgeted search for a merge of fine-tunes of one base.

Modules: `text` (evaluation texts), `score` (scoring models), `report` (weight report),
`search` (suggest a merge).
"""
