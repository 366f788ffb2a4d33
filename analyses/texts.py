"""Built-in natural texts (written for interp, public domain): sixteen genres, a few hundred tokens each, so
that per-head summaries average over narrative, dialogue, code, lists and expository prose."""

TEXTS: tuple[str, ...] = (
    # narrative
    "The lighthouse keeper had not spoken to anyone in eleven days when the boat appeared. It came in low "
    "against the grey water, its engine coughing, and a woman in a yellow coat stood at the bow holding a "
    "rope she clearly did not know how to throw. He walked down the slick stone steps to the landing and "
    "waved her toward the iron ring set into the rock. She missed it twice. On the third try the rope caught, "
    "and she laughed, a short surprised sound that the wind took away at once. 'I was told you had a radio,' "
    "she said. 'Mine stopped working yesterday, and my brother expects me in the harbour by tonight.' He "
    "nodded and led her up to the kitchen, where the kettle was already warm on the stove.",
    # news report
    "City officials announced on Tuesday that the central library will extend its opening hours from next "
    "month, keeping the reading rooms open until ten in the evening on weekdays. The change follows a survey "
    "in which more than four thousand residents said they could not visit during the day because of work or "
    "school. The library's director said the extra hours would be paid for by closing two smaller storage "
    "sites and moving their collections to the main building. Local student groups welcomed the decision, "
    "although some staff members raised concerns about security late at night. A review of the new schedule "
    "is planned for the end of the year, when visitor numbers will be compared with the same period last year.",
    # science explainer
    "Plants take in carbon dioxide through small openings on the underside of their leaves called stomata. "
    "Inside the leaf, chloroplasts use the energy of sunlight to split water molecules, releasing oxygen as a "
    "by-product. The hydrogen and the energy captured from light are then used to turn carbon dioxide into "
    "sugars in a series of reactions known as the Calvin cycle. Because the stomata also let water vapour "
    "escape, plants face a constant trade-off: opening them wide speeds up photosynthesis but increases water "
    "loss. Many desert plants solve this by opening their stomata only at night, storing carbon dioxide as an "
    "acid, and using it during the day while the openings stay closed.",
    # recipe
    "Lentil soup for four. Rinse two hundred grams of red lentils under cold water until the water runs clear. "
    "In a large pot, warm two tablespoons of olive oil and cook one chopped onion, two sliced carrots and a "
    "stick of celery over medium heat for about eight minutes, stirring now and then. Add two crushed garlic "
    "cloves, a teaspoon of ground cumin and half a teaspoon of smoked paprika, and stir for one minute. Pour "
    "in the lentils, a tin of chopped tomatoes and one litre of vegetable stock. Bring to a boil, then lower "
    "the heat and simmer for twenty-five minutes. Season with salt, pepper and the juice of half a lemon, and "
    "blend half of the soup if you prefer it thicker.",
    # code
    "def merge_intervals(intervals):\n"
    "    \"\"\"Merge overlapping [start, end] intervals and return them sorted by start.\"\"\"\n"
    "    if not intervals:\n"
    "        return []\n"
    "    intervals = sorted(intervals, key=lambda pair: pair[0])\n"
    "    merged = [list(intervals[0])]\n"
    "    for start, end in intervals[1:]:\n"
    "        last = merged[-1]\n"
    "        if start <= last[1]:\n"
    "            last[1] = max(last[1], end)\n"
    "        else:\n"
    "            merged.append([start, end])\n"
    "    return merged\n\n\n"
    "if __name__ == \"__main__\":\n"
    "    print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))\n"
    "    print(merge_intervals([[1, 4], [4, 5]]))\n",
    # dialogue
    "'Did you remember to book the train tickets?' asked Maya, looking up from her laptop.\n"
    "'I booked them last night,' said Tom. 'We leave at seven forty from platform three.'\n"
    "'Seven forty in the morning? That means leaving the house before seven.'\n"
    "'It was the only train with two seats together. The later ones were almost full.'\n"
    "'Fine. But you are making the coffee.'\n"
    "'I will make the coffee and pack the sandwiches. You just have to wake up.'\n"
    "'That is the hardest part, and you know it.'\n"
    "Tom laughed and set an alarm on his phone, then a second one, just in case.",
    # poem
    "The river keeps no record of the rain,\n"
    "it takes the storm and gives it back as light;\n"
    "the heron waits, and waits, and waits again,\n"
    "a grey thought standing at the edge of night.\n"
    "The alders lean to hear what water says,\n"
    "the stones reply in voices worn and low,\n"
    "and all the slow arithmetic of days\n"
    "is carried down to where the rivers go.\n"
    "I stood there once, when I was nine or ten,\n"
    "and threw a stick, and watched it turn and spin;\n"
    "I think of it, and of the boy, and then\n"
    "I wonder where the river took him in.",
    # history
    "The printing press developed by Johannes Gutenberg around 1450 combined several existing technologies: "
    "the screw press used for making wine and oil, oil-based inks, and a new method of casting individual "
    "metal letters in a hand mould. Because the letters could be rearranged and reused, a workshop could "
    "produce hundreds of identical copies of a page far faster than a scribe could write one. Within fifty "
    "years, printing shops had opened in more than two hundred European cities, and millions of books were "
    "in circulation. Historians still debate how quickly the press changed ordinary life, but it clearly "
    "lowered the price of books and helped standardise spelling in many languages.",
    # terms and conditions
    "1. Scope. These terms apply to every order placed through the online shop. By placing an order, the "
    "customer accepts these terms in the version valid at the time of the order.\n"
    "2. Prices and payment. All prices include value added tax. Payment is due within fourteen days of the "
    "invoice date. If payment is late, the seller may charge interest at the statutory rate.\n"
    "3. Delivery. Delivery times are estimates unless agreed in writing. The risk passes to the customer when "
    "the goods are handed to the carrier.\n"
    "4. Returns. The customer may return unused goods within thirty days of delivery. The seller refunds the "
    "purchase price within fourteen days of receiving the returned goods.",
    # email
    "Hi Priya,\n\nThanks for sending the draft report yesterday. I read it on the train this morning and I "
    "think the structure works well. Two small things: the chart on page six uses last year's numbers, and "
    "the summary still mentions the old budget of forty thousand rather than the revised fifty-two thousand. "
    "Could you update both before Thursday? I would also like to add a short paragraph about the delays at "
    "the supplier, since the board will ask about it. I can write that part myself if you send me the "
    "editable version.\n\nSee you at the meeting on Friday,\nDaniel",
    # review
    "I bought this kettle three months ago after my old one started leaking, and overall I am happy with it. "
    "It boils a full litre in just under three minutes, which is faster than I expected, and the automatic "
    "switch has never failed. The handle stays cool and the lid opens wide enough to clean the inside easily. "
    "My only complaint is the noise: it is louder than my previous kettle, especially in the last thirty "
    "seconds before it switches off. The blue light is also very bright at night. For the price, though, it "
    "is a solid choice, and I would buy it again.",
    # mathematics
    "To see why the sum of the first n odd numbers equals n squared, arrange dots in a square. A single dot "
    "is a one by one square. Adding three dots along two sides turns it into a two by two square. Adding five "
    "more dots along the next two sides makes a three by three square, and in general, going from a k by k "
    "square to a k plus one by k plus one square needs exactly two k plus one new dots, which is the next "
    "odd number. So after adding the first n odd numbers we have an n by n square, with n squared dots. The "
    "same fact can be proved by induction, but the picture explains why it is true.",
    # travel guide
    "The old town is best explored on foot, starting at the market square early in the morning before the "
    "tour groups arrive. From the square, follow the narrow street that climbs toward the castle; it passes "
    "a bakery famous for its poppy seed rolls and a small museum of clocks that is easy to miss. The castle "
    "gardens are free to enter and offer the best view over the river. In the afternoon, take the ferry to "
    "the island, where a path of about five kilometres circles the shore through pine woods. The last ferry "
    "back leaves at half past six in summer and at five in winter, so check the timetable before you go.",
    # sports report
    "The home side came from two goals down to win three to two on Saturday, with the winning goal scored in "
    "the final minute of added time. The visitors had taken control early, scoring twice in the first twenty "
    "minutes through quick counter attacks down the left wing. After the break, the home coach replaced both "
    "full backs and moved to a back three, and the change worked almost at once. A header from a corner "
    "reduced the deficit, and a long-range shot levelled the score with ten minutes left. The winner came "
    "when the young substitute, playing only his second match, turned his marker and shot low into the corner.",
    # children's story
    "Once upon a time there was a small fox who was afraid of the dark. Every evening, when the sun went down "
    "behind the hill, she curled up at the back of her den and covered her eyes with her tail. One night, her "
    "friend the owl landed at the entrance. 'Come outside,' said the owl. 'I want to show you something.' "
    "The little fox did not want to go, but the owl waited and waited, so at last she crept out. Above the "
    "trees, the sky was full of stars, more than she could ever count. 'The dark is where the stars live,' "
    "said the owl. From then on, the little fox went out every night to say hello to them.",
    # technical documentation
    "Configuration. The service reads its settings from a file named config.toml in the working directory, "
    "or from the path given by the environment variable APP_CONFIG. Every setting can also be overridden on "
    "the command line. The most important options are: port, the TCP port to listen on (default 8080); "
    "workers, the number of worker processes (default: the number of CPU cores); and log_level, one of debug, "
    "info, warning or error (default info). When the file contains an unknown option, the service refuses to "
    "start and prints the name of the option and the line where it appears. Changes to the file take effect "
    "after a restart; send the signal HUP to reload the log settings without restarting.",
)
