"""Easel inside your own discord.py bot: a discord.py extension.

    class MyBot(commands.Bot):
        async def setup_hook(self) -> None:
            await self.load_extension("adapters.discord_plugin")

Loading it adds `EaselCog` (adapters/discord.py) to your bot: Easel's slash commands join your
bot's command tree beside your own (sync the tree as you already do), its result buttons are
registered, and its delivery loop starts; unloading the extension, or closing the bot, stops it.
Your bot logs in, connects and owns the client; Easel only adds to it.

Which Easel it serves:
- `bot.easel_core`, when your bot has opened one (`bot.easel_core = await open_core(settings)`) to
  share it or to build its settings in code; your bot closes it.
- Otherwise Easel's configuration, read as `easel` reads it (the file in EASEL_CONFIG, else
  ./easel.toml, and EASEL_* environment variables); opened here and closed on unload.

Images are made by a worker on the same database and data folder (`easel worker`), as with
`easel serve`. A separate module from adapters/discord.py on purpose: discord.py imports an extension
afresh and drops it from `sys.modules` on unload, which must not happen to the adapter's classes.
"""

from __future__ import annotations

from discord.ext import commands

from adapters.discord import EaselCog
from adapters.discord_render import COG_NAME
from bot.bootstrap import Core, open_core
from bot.config import load_settings
from bot.errors import ConfigError

__all__ = ["CORE_ATTRIBUTE", "EaselCog", "setup", "teardown"]

CORE_ATTRIBUTE = "easel_core"  # the attribute of the host bot that may hold its own Core


async def setup(bot: commands.Bot) -> None:
    """Called by `bot.load_extension("adapters.discord_plugin")`: add Easel's cog to `bot`."""
    core = getattr(bot, CORE_ATTRIBUTE, None)
    if core is not None and not isinstance(core, Core):
        raise ConfigError(f"bot.{CORE_ATTRIBUTE} is a {type(core).__name__}, not Easel's Core; set it to what "
                          "bot.bootstrap.open_core returns, or leave it unset to use Easel's config file")
    owns_core = core is None
    if core is None:
        core = await open_core(load_settings())
    try:
        await bot.add_cog(EaselCog(bot, core, owns_core=owns_core))
    except BaseException:
        if owns_core:
            await core.close()
        raise


async def teardown(bot: commands.Bot) -> None:
    """Called on unload. The cog's class lives in adapters.discord, not in this module, so discord.py
    would not remove it by itself."""
    await bot.remove_cog(COG_NAME)
