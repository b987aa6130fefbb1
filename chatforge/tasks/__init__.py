"""Tasks: conversation sources for post-training and the problems, answers and verifiers that
evaluation and RL share. Each module reads its data through the data-directory setting and yields
conversations in the chat protocol of chatforge/tokenizer.py (lists of {role, content, ...} messages)."""
