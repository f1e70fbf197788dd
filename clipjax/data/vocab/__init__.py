"""Data files that ship with clipjax: OpenAI CLIP's BPE vocabulary (see NOTICE.txt)."""
