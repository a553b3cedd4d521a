"""ImageBind encoder: the official architecture, our in-memory preprocessing, and a shared, thread-safe wrapper.

Submodules are imported explicitly (`from mm_llm_ros.core.imagebind.model import ImageBindEncoder`) so that
importing this package stays cheap.
"""
