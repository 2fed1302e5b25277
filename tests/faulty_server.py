"""A ChatServer replica that can be made to hang, for test_serve's health test. Ray Serve imports it by name in
the replica (the tests directory is on the workers' PYTHONPATH)."""
import os
import time

from ray import serve

from serve.app import ChatServer


class HangingChatServer(ChatServer.func_or_class):
    """The first model call after `hang_file` appears deletes the file and never returns: a hung step, as a stuck
    collective or a wedged device would leave it. A replica started afterwards works normally."""

    async def __init__(self, config, hang_file):  # Serve's ingress makes the parent's __init__ async
        await super().__init__(config)
        model = self.service.model
        forward = model.forward

        def forward_or_hang(*args, **kwargs):
            if os.path.exists(hang_file):
                os.remove(hang_file)
                while True:
                    time.sleep(1)
            return forward(*args, **kwargs)
        model.forward = forward_or_hang


HangingChatServerDeployment = serve.deployment(HangingChatServer, name="HangingChatServer")
